//! The plain-text table printed at the end of `shoal-bench cluster`.

use std::fmt::Write;

use crate::cluster::{ClusterResult, NodeSeconds};
use crate::cpu::{PhaseCpu, QuietWait};
use crate::remap::{Change, Ownership};
use crate::report::{mib, opt};
use crate::stats::Latency;

fn latency(l: &Latency) -> String {
    format!(
        "p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms ({} samples)",
        l.p50_ms, l.p99_ms, l.max_ms, l.count
    )
}

fn per_node_seconds(v: &[NodeSeconds]) -> String {
    v.iter()
        .map(|n| format!("{} {}", n.node, opt(n.seconds, 3, " s")))
        .collect::<Vec<_>>()
        .join(", ")
}

fn quiet(q: &QuietWait) -> String {
    format!(
        "waited {:.0} s; others used {} of the machine before the start{}",
        q.waited_seconds,
        opt(q.others_share.map(|s| 100.0 * s), 0, "%"),
        if q.quiet { "" } else { " (NOT QUIET)" }
    )
}

fn cpu_rows(rows: &mut Vec<(String, String)>, cpu: &PhaseCpu) {
    for n in &cpu.nodes {
        rows.push((
            format!("  {}", n.node),
            format!(
                "cpu {} ({}), rss {} -> {}",
                opt(n.cpu_seconds, 2, " s"),
                opt(n.cpu_percent, 0, "% of a core"),
                mib(n.rss_start_bytes),
                mib(n.rss_end_bytes)
            ),
        ));
    }
    rows.push((
        "  bench, others".into(),
        format!(
            "bench cpu {} ({}), other processes {} in {:.2} s",
            opt(cpu.bench_seconds, 2, " s"),
            opt(cpu.bench_percent, 0, "% of a core"),
            opt(cpu.others_seconds, 2, " s"),
            cpu.wall_seconds
        ),
    ));
}

fn ownership(o: &Ownership) -> String {
    let owned = o
        .members
        .iter()
        .zip(&o.owned)
        .map(|(m, k)| format!("{m} {k}"))
        .collect::<Vec<_>>()
        .join(", ");
    format!("{owned}; {} disagreements between nodes", o.disagreements)
}

fn change_rows(rows: &mut Vec<(String, String)>, what: &str, c: &Change) {
    rows.push((
        what.into(),
        format!(
            "{}: rings converged after {:.2} s",
            c.node, c.converged_seconds
        ),
    ));
    rows.push(("  owners after".into(), ownership(&c.after)));
    rows.push((
        "  moved".into(),
        format!(
            "{} keys = {:.2}% ({} via {}; minimum possible {:.2}%)",
            c.moved,
            100.0 * c.moved_fraction,
            c.moved_via_changed_node,
            c.node,
            100.0 * c.minimum_fraction
        ),
    ));
    rows.push((
        "  hash % N".into(),
        format!(
            "would move {} keys = {:.2}% ({} -> {} members)",
            c.modulo_moved,
            100.0 * c.modulo_fraction,
            // before = after -/+ 1
            if what == "kill" {
                c.after.members.len() + 1
            } else {
                c.after.members.len() - 1
            },
            c.after.members.len()
        ),
    ));
}

/// Renders a result as an aligned two-column table.
pub fn table(r: &ClusterResult) -> String {
    let m = &r.machine;
    let c = &r.config;
    let mut rows: Vec<(String, String)> = vec![
        (
            "machine".into(),
            format!("{} CPUs, {}, kernel {}", m.cpus, m.cpu_model, m.kernel),
        ),
        (
            "started".into(),
            format!(
                "{}, load average {}",
                m.started_utc,
                m.load_average.map_or("n/a".into(), |l| format!(
                    "{:.2} {:.2} {:.2}",
                    l[0], l[1], l[2]
                ))
            ),
        ),
        (
            "cluster".into(),
            format!(
                "{} nodes on loopback ({}); converged {:.2} s after the first start",
                c.nodes,
                r.nodes
                    .iter()
                    .map(|n| format!("{} pid {}", n.id, n.pid))
                    .collect::<Vec<_>>()
                    .join(", "),
                r.startup_seconds
            ),
        ),
    ];
    if let Some(reg) = &r.register {
        rows.push((String::new(), String::new()));
        rows.push((
            "register".into(),
            format!(
                "{} sessions ({:?} per node) x {} instances over {} services, {} in flight per session",
                c.sessions, reg.sessions_per_node, c.instances_per_session, c.services, c.concurrency
            ),
        ));
        rows.push(("  quiet".into(), quiet(&reg.quiet)));
        rows.push((
            "  acknowledged".into(),
            format!(
                "{} in {:.2} s: {:.0} registrations/s",
                reg.instances, reg.ack_seconds, reg.ack_per_second
            ),
        ));
        rows.push(("  latency".into(), latency(&reg.latency)));
        rows.push((
            "  on every node".into(),
            format!(
                "{} s: {} registrations/s",
                opt(reg.all_visible_seconds, 2, ""),
                opt(reg.all_visible_per_second, 0, "")
            ),
        ));
        rows.push(("  counted at".into(), per_node_seconds(&reg.visible)));
        rows.push((
            "  nodes cpu/1000".into(),
            opt(
                reg.nodes_cpu_ms_per_1000,
                1,
                " ms per 1000 registrations, all nodes",
            ),
        ));
        cpu_rows(&mut rows, &reg.cpu);
    }
    for v in &r.visibility {
        rows.push((String::new(), String::new()));
        rows.push((
            "visibility".into(),
            format!(
                "target {}/s for {} s from {} writer session(s) on {}, {} services x {} slots",
                v.target_rate, v.planned_seconds, v.writers, v.writer_node, v.services, v.slots
            ),
        ));
        rows.push(("  quiet".into(), quiet(&v.quiet)));
        rows.push((
            "  writes".into(),
            format!(
                "{} ({} failed) in {:.2} s: {:.0}/s offered; at most {:.1} ms behind schedule",
                v.writes,
                v.write_errors,
                v.send_seconds,
                v.sent_per_second,
                v.max_behind_schedule_ms
            ),
        ));
        rows.push(("  ack".into(), latency(&v.ack_latency)));
        for n in &v.per_node {
            rows.push((
                format!("  seen on {}", n.node),
                format!("{}; {} not seen", latency(&n.latency), n.not_seen),
            ));
        }
        rows.push((
            "  on every node".into(),
            format!(
                "{}; {} not seen everywhere",
                latency(&v.all_nodes),
                v.not_seen_everywhere
            ),
        ));
        if let Some(w) = v.slowest.first() {
            rows.push((
                "  slowest write".into(),
                format!(
                    "#{} (service {}): {}",
                    w.seq,
                    w.service,
                    v.per_node
                        .iter()
                        .zip(&w.per_node_ms)
                        .map(|(n, ms)| format!("{} {}", n.node, opt(*ms, 2, " ms")))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ));
        }
        rows.push((
            "  writer cleanup".into(),
            format!("gone after {}", per_node_seconds(&v.cleanup)),
        ));
        cpu_rows(&mut rows, &v.cpu);
    }
    if let Some(close) = &r.close {
        rows.push((String::new(), String::new()));
        rows.push((
            "close".into(),
            format!(
                "{} sessions said Goodbye; their {} instances gone from every node after {} s",
                close.sessions,
                close.instances,
                opt(close.all_gone_seconds, 2, "")
            ),
        ));
        rows.push(("  gone at".into(), per_node_seconds(&close.gone)));
    }
    if let Some(remap) = &r.remap {
        rows.push((String::new(), String::new()));
        rows.push((
            "remap".into(),
            format!("{} service keys; {}", remap.keys, quiet(&remap.quiet)),
        ));
        rows.push(("  owners at start".into(), ownership(&remap.start)));
        change_rows(&mut rows, "kill", &remap.kill);
        rows.push((
            "restart".into(),
            format!(
                "{} back: rings converged after {:.2} s; {} keys differ from the start",
                remap.kill.node, remap.rejoin_converged_seconds, remap.rejoin_differs
            ),
        ));
        change_rows(&mut rows, "join", &remap.join);
        cpu_rows(&mut rows, &remap.cpu);
    }
    let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    let mut out = String::new();
    for (k, v) in rows {
        if k.is_empty() {
            out.push('\n');
        } else {
            // Writing to a String cannot fail.
            let _ = writeln!(out, "{k:<width$}  {v}");
        }
    }
    out
}
