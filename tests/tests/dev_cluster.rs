//! `shoal dev`, the command behind `make run`: it starts a 3-node cluster with
//! development certificates, the cluster serves what its banner says, and stopping the
//! command stops every node it started, whichever way it is stopped and even when a
//! node fails to start.

use std::io::{BufRead, BufReader};
use std::net::{TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use shoal_tests::*;

/// Generous bound for anything the cluster does on its own clock.
const PATIENCE: Duration = Duration::from_secs(60);

/// A base port whose six ports (QUIC and HTTP of three nodes, 10 apart) are free now,
/// below the system's ephemeral range (32768 and up here), where the nodes of other
/// tests get theirs. Bases are 30 apart, so two clusters' ports never overlap, and a
/// base is handed out once per process: the tests of this file run at once, and one
/// may look before the other's `shoal dev` has bound what it was given. Another process
/// may still take a port before `shoal dev` binds it; then the command fails with a
/// clear error (see [`start_dev`]).
fn free_base_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap_or_else(|p| p.into_inner());
    // Where to start looking: spread over the range by process and time, so that test
    // processes running at once look in different places.
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos() as u64);
    let seed = std::process::id() as u64 * 7919 + nanos;
    for attempt in 0..400u64 {
        // 20000..=31970: the last cluster's ports end at 31991.
        let base = 20_000 + ((seed + attempt) % 400) as u16 * 30;
        if given.contains(&base) {
            continue;
        }
        let all_free = (0..3).all(|i| {
            let quic = base + 10 * i;
            UdpSocket::bind(("127.0.0.1", quic)).is_ok()
                && TcpListener::bind(("127.0.0.1", quic + 1)).is_ok()
        });
        if all_free {
            given.push(base);
            return base;
        }
    }
    panic!("no free base port found");
}

/// Starts `shoal dev` in `dir` and waits for its banner. If a node could not start
/// because another process took one of its ports after [`free_base_port`] looked,
/// tries again on other ports (three times at most).
async fn start_dev(dir: &Path) -> (Dev, Vec<String>) {
    for _ in 0..3 {
        let mut dev = Dev::spawn(dir, free_base_port());
        let said = dev
            .read_until_any(&["Ctrl-C stops the cluster", "exited ("])
            .await;
        if said
            .last()
            .is_some_and(|l| l.contains("Ctrl-C stops the cluster"))
        {
            return (dev, said);
        }
        let status = dev.wait_exit().await;
        eprintln!(
            "shoal dev failed ({status}), trying other ports:\n{}",
            said.join("\n")
        );
    }
    panic!("shoal dev did not start in three tries");
}

/// A running `shoal dev`, the lines it prints (stdout and stderr) read as they come.
/// Dropping it kills the command and, through the directory in their command lines,
/// any node left behind.
struct Dev {
    child: Child,
    lines: std::sync::mpsc::Receiver<String>,
    dir: PathBuf,
}

impl Dev {
    fn spawn(dir: &Path, base_port: u16) -> Dev {
        let mut child = shoal_command()
            .args(["dev", "--nodes", "3", "--base-port", &base_port.to_string()])
            .arg("--dir")
            .arg(dir)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run shoal dev: {e}"));
        let (tx, lines) = std::sync::mpsc::channel();
        let stdout = child.stdout.take().expect("piped stdout");
        let stderr = child.stderr.take().expect("piped stderr");
        for out in [
            Box::new(stdout) as Box<dyn std::io::Read + Send>,
            Box::new(stderr),
        ] {
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(out).lines().map_while(|l| l.ok()) {
                    let _ = tx.send(line);
                }
            });
        }
        Dev {
            child,
            lines,
            dir: dir.to_path_buf(),
        }
    }

    /// Lines until one contains `marker` (that one included); panics after PATIENCE.
    async fn read_until(&mut self, marker: &str) -> Vec<String> {
        self.read_until_any(&[marker]).await
    }

    /// Lines until one contains any of `markers` (that one included); panics after
    /// PATIENCE.
    async fn read_until_any(&mut self, markers: &[&str]) -> Vec<String> {
        let deadline = Instant::now() + PATIENCE;
        let mut seen = Vec::new();
        loop {
            while let Ok(line) = self.lines.try_recv() {
                let done = markers.iter().any(|m| line.contains(m));
                seen.push(line);
                if done {
                    return seen;
                }
            }
            assert!(
                Instant::now() < deadline,
                "shoal dev printed none of {markers:?} in {PATIENCE:?}; it printed:\n{}",
                seen.join("\n")
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits for the command to end (bounded) and returns its exit status.
    async fn wait_exit(&mut self) -> std::process::ExitStatus {
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(status) = self.child.try_wait().expect("waiting for shoal dev") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "shoal dev did not end within {PATIENCE:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Dev {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        for pid in node_pids(&self.dir) {
            let _ = std::process::Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
        }
    }
}

/// The pids of live processes whose command line names `dir` (the nodes of one
/// `shoal dev`; each gets `--data-dir <dir>/node-N`). Zombies do not count.
fn node_pids(dir: &Path) -> Vec<u32> {
    let needle = dir.display().to_string();
    let mut pids = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return pids;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        let zombie = std::fs::read_to_string(entry.path().join("stat"))
            .map(|s| {
                s.rsplit(')')
                    .next()
                    .unwrap_or("")
                    .trim_start()
                    .starts_with('Z')
            })
            .unwrap_or(true);
        if cmdline.contains(" server ") && cmdline.contains(&needle) && !zombie {
            pids.push(pid);
        }
    }
    pids
}

/// The value of `export NAME=value` in the banner.
fn exported(banner: &[String], name: &str) -> String {
    let prefix = format!("export {name}=");
    banner
        .iter()
        .find_map(|l| l.trim().strip_prefix(&prefix).map(str::to_string))
        .unwrap_or_else(|| panic!("the banner sets no {name}:\n{}", banner.join("\n")))
}

/// Runs `shoal <args>` to its end (30 s at most) with the banner's servers and CA.
async fn cli(servers: &str, ca: &str, args: &[&str]) -> CliOutput {
    let mut cmd = shoal_command();
    cmd.args(args)
        .env("SHOAL_SERVERS", servers)
        .env("SHOAL_CA", ca);
    run_to_end(cmd, &format!("shoal {args:?}")).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shoal_dev_serves_what_its_banner_says_and_sigterm_stops_every_node() {
    let dir = unique_temp_dir("shoal-test-dev");
    let (mut dev, banner) = start_dev(&dir).await;
    assert_eq!(
        node_pids(&dir).len(),
        3,
        "three node processes:\n{}",
        banner.join("\n")
    );

    // What the banner tells a user to do works: register through the first node (the
    // command holds the instance while it runs), list it through the last.
    let servers = exported(&banner, "SHOAL_SERVERS");
    let ca = exported(&banner, "SHOAL_CA");
    let nodes: Vec<&str> = servers.split(',').collect();
    assert_eq!(nodes.len(), 3, "{servers}");
    let members = cli(&servers, &ca, &["members", "--json"]).await;
    assert!(members.status.success(), "{members:?}");
    let mut register = shoal_command()
        .args(["register", "orders", "10.0.0.1:8080", "--server", nodes[0]])
        .env("SHOAL_CA", &ca)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("shoal register");
    wait_for("the instance listed by the last node", PATIENCE, || async {
        let out = cli(
            &servers,
            &ca,
            &["list", "orders", "--json", "--server", nodes[2]],
        )
        .await;
        out.status.success() && out.stdout.contains("10.0.0.1")
    })
    .await;
    let _ = register.kill();
    let _ = register.wait();

    send_sigterm(dev.child.id());
    let status = dev.wait_exit().await;
    assert!(status.success(), "shoal dev ended with {status}");
    wait_for("every node process gone", PATIENCE, || async {
        node_pids(&dir).is_empty()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shoal_dev_stops_the_nodes_it_started_when_one_cannot_start() {
    let dir = unique_temp_dir("shoal-test-dev");
    // Something else holds node-2's HTTP port and never answers on it (on other ports
    // if another process took that one first).
    let (base, _squatter) = (0..3)
        .find_map(|_| {
            let base = free_base_port();
            TcpListener::bind(("127.0.0.1", base + 11))
                .ok()
                .map(|l| (base, l))
        })
        .expect("binding node-2's HTTP port");
    let mut dev = Dev::spawn(&dir, base);
    // The error names the node that failed (read_until panics, with what it read, if
    // it does not).
    dev.read_until("node-2 exited").await;
    let status = dev.wait_exit().await;
    assert!(!status.success(), "shoal dev must fail");
    let log = std::fs::read_to_string(dir.join("node-2/node.log")).unwrap_or_default();
    assert!(
        log.contains("Address already in use"),
        "node-2's log says why:\n{log}"
    );
    wait_for("the nodes that did start gone", PATIENCE, || async {
        node_pids(&dir).is_empty()
    })
    .await;
}
