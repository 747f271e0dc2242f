//! The `shoal` client commands against a real node, run as a user runs them: separate
//! processes, killed the way real processes die.

use std::time::Duration;

use shoal_tests::*;

/// Generous bound for anything the node does on its own clock.
const PATIENCE: Duration = Duration::from_secs(20);

/// Whether `shoal list <service> --json` shows `ip:port`.
async fn listed(node: &Node, service: &str, ip: &str, port: u16) -> bool {
    let view = shoal_cli(node, &["list", service, "--json"]).await.json();
    view["instances"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|i| i["ip"] == ip && i["port"] == port)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_register_process_loses_its_instance_after_idle_timeout_and_grace() {
    let node = Node::start(
        NodeOptions::default()
            .session_grace_ms(1_500)
            .idle_timeout_ms(2_000)
            .keep_alive_interval_ms(500),
    )
    .await;

    let mut register = CliProcess::spawn(&node, &["register", "svc", "10.0.0.1:80", "--json"]);
    let line = register.next_line(PATIENCE).await;
    let registered: Value = serde_json::from_str(&line)
        .unwrap_or_else(|e| panic!("`register --json` printed {line:?}: {e}"));
    assert_eq!(registered["event"], "registered", "{line}");
    assert!(
        listed(&node, "svc", "10.0.0.1", 80).await,
        "shoal list must show the instance `shoal register` holds"
    );

    // The process dies without a word: no Goodbye, no close.
    register.kill9();
    assert!(
        listed(&node, "svc", "10.0.0.1", 80).await,
        "the node cannot know yet; the instance stays for idle timeout + grace"
    );
    wait_for(
        "the killed client's instance to leave (idle timeout + grace)",
        PATIENCE,
        || async { !listed(&node, "svc", "10.0.0.1", 80).await },
    )
    .await;
    assert!(node.instances(&svc("svc")).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_register_process_stopped_with_sigterm_removes_its_instance_at_once() {
    // A long grace period: if the instance goes, the command's Goodbye removed it.
    let node = Node::start(NodeOptions::default().session_grace_ms(120_000)).await;
    let mut register = CliProcess::spawn(
        &node,
        &["register", "orders", "10.0.0.2:8080", "--meta", "version=1"],
    );
    let line = register.next_line(PATIENCE).await;
    assert!(line.starts_with("registered "), "{line}");
    let listed_now = node.instance(&svc("orders"), "10.0.0.2", 8080).await;
    let listed_now = listed_now.expect("registered instance is listed");
    assert_eq!(listed_now["metadata"]["version"], "1");

    let status = register.terminate().await;
    assert!(
        status.success(),
        "register exited {status}: {}",
        register.stderr()
    );
    wait_for("the instance removed by Goodbye", PATIENCE, || async {
        node.instance(&svc("orders"), "10.0.0.2", 8080)
            .await
            .is_none()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_reports_bad_input_with_the_servers_reason() {
    let node = Node::start(NodeOptions::default()).await;
    let out = shoal_cli(&node, &["register", "a b", "10.0.0.1:80"]).await;
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(out.stderr.contains("InvalidName"), "{out:?}");
    assert!(
        node.dump().await == Value::Array(vec![]),
        "nothing registered"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_serves_on_the_worker_threads_it_is_given_and_refuses_too_many() {
    // One worker thread, as `shoal dev` and the benchmark give each of three nodes on
    // a two-CPU machine: every path (client session, HTTP, timers) still runs.
    let node = Node::start(NodeOptions::default().arg("--worker-threads").arg("1")).await;
    let mut held = CliProcess::spawn(&node, &["register", "one-worker", "10.0.0.1:80"]);
    wait_for("the instance listed", PATIENCE, || async {
        listed(&node, "one-worker", "10.0.0.1", 80).await
    })
    .await;
    held.terminate().await;
    wait_for("the instance gone", PATIENCE, || async {
        !listed(&node, "one-worker", "10.0.0.1", 80).await
    })
    .await;

    refused_at_start(
        &["--worker-threads", "5000"],
        "worker_threads (5000) must be at most 1024",
    )
    .await;
    // The node above spun before its parks (the default); a spin beyond the bound
    // is refused the same way.
    refused_at_start(
        &["--idle-spin-us", "5000"],
        "idle_spin_us (5000) must be at most 1000",
    )
    .await;
}

/// `shoal server` with `flags` exits with an error that says `why`.
async fn refused_at_start(flags: &[&str], why: &str) {
    let mut cmd = shoal_command();
    cmd.arg("server")
        .args(flags)
        .args(["--listen-addr", "127.0.0.1:0"]);
    let out = run_to_end(cmd, &format!("shoal server {}", flags.join(" "))).await;
    assert!(!out.status.success(), "{out:?}");
    assert!(out.stderr.contains(why), "{out:?}");
}
