//! The plain-text table printed at the end of a run.

use std::fmt::Write;

use crate::single_node::{CpuUse, SingleNodeResult};

pub(crate) fn opt(v: Option<f64>, digits: usize, unit: &str) -> String {
    v.map_or_else(|| "n/a".to_string(), |v| format!("{v:.digits$}{unit}"))
}

pub(crate) fn mib(bytes: Option<u64>) -> String {
    opt(bytes.map(|b| b as f64 / (1024.0 * 1024.0)), 1, " MiB")
}

fn cpu_line(cpu: &CpuUse) -> String {
    format!(
        "node {} ({}), bench {} ({}), other processes {}",
        opt(cpu.server_seconds, 2, " s"),
        opt(cpu.server_percent, 0, "% of a core"),
        opt(cpu.client_seconds, 2, " s"),
        opt(cpu.client_percent, 0, "% of a core"),
        opt(cpu.others_seconds, 2, " s"),
    )
}

/// Renders a result as an aligned two-column table.
pub fn table(r: &SingleNodeResult) -> String {
    let c = &r.config;
    let reg = &r.register;
    let q = &r.query;
    let m = &r.machine;
    let rows: Vec<(&str, String)> = vec![
        (
            "machine",
            format!("{} CPUs, {}, kernel {}", m.cpus, m.cpu_model, m.kernel),
        ),
        (
            "started",
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
            "workload",
            format!(
                "{} sessions x {} instances over {} services; {} in flight per client; seed {}",
                c.sessions, c.instances_per_session, c.services, c.concurrency, c.seed
            ),
        ),
        ("", String::new()),
        (
            "register",
            format!(
                "{} instances in {:.2} s: {:.0} registrations/s",
                reg.instances, reg.seconds, reg.per_second
            ),
        ),
        (
            "  latency",
            format!(
                "p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
                reg.latency.p50_ms, reg.latency.p99_ms, reg.latency.max_ms
            ),
        ),
        ("  cpu", cpu_line(&reg.cpu)),
        (
            "  node cpu/1000",
            opt(reg.server_cpu_ms_per_1000, 1, " ms per 1000 registrations"),
        ),
        (
            "  node rss",
            format!(
                "{} before, {} after, {} per instance",
                mib(r.memory.rss_before_bytes),
                mib(r.memory.rss_after_bytes),
                opt(r.memory.rss_per_instance_bytes, 0, " B")
            ),
        ),
        ("", String::new()),
        (
            "query",
            format!(
                "{} queries in {:.2} s by {} clients x {} tasks: {:.0} queries/s",
                q.queries, q.seconds, q.clients, c.concurrency, q.per_second
            ),
        ),
        (
            "  latency",
            format!(
                "p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
                q.latency.p50_ms, q.latency.p99_ms, q.latency.max_ms
            ),
        ),
        (
            "  answers",
            format!(
                "{:.1} instances on average; {} errors",
                q.instances_per_answer, q.errors
            ),
        ),
        ("  cpu", cpu_line(&q.cpu)),
        (
            "  node cpu/1000",
            opt(q.server_cpu_ms_per_1000, 1, " ms per 1000 queries"),
        ),
    ];
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
