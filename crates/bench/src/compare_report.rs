//! The table and the latency plot of `shoal-bench compare`.

use std::fmt::Write;

use crate::compare::{Better, CompareResult, Figure};
use crate::stats::Latency;
use crate::target::TargetKind;

/// A figure as text: thousands grouped for large values, a few digits for small ones.
pub fn number(v: f64) -> String {
    let a = v.abs();
    if a >= 1000.0 {
        let whole = format!("{:.0}", a);
        let mut grouped = String::new();
        for (i, c) in whole.chars().enumerate() {
            if i > 0 && (whole.len() - i) % 3 == 0 {
                grouped.push(' ');
            }
            grouped.push(c);
        }
        format!("{}{grouped}", if v < 0.0 { "-" } else { "" })
    } else if a >= 100.0 || a == 0.0 || a == a.trunc() {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// The ratio column: how many times better Shoal is (above 1: better; below 1:
/// worse), taking the direction of the figure into account.
pub fn ratio(better: Better, rnacos: Option<f64>, shoal: Option<f64>) -> String {
    let (Some(r), Some(s)) = (rnacos, shoal) else {
        return String::new();
    };
    // Past 100 the ratio says nothing more (a divisor of about 0, printed as 0, gave
    // twelve-digit ratios).
    let x = match better {
        Better::Higher if r > 0.0 && s / r > 100.0 => return ">100x".into(),
        Better::Higher if r > 0.0 => s / r,
        Better::Lower if s == 0.0 && r == 0.0 => return "=".into(),
        Better::Lower if s == 0.0 || r / s > 100.0 => return ">100x".into(),
        Better::Lower => r / s,
        Better::Neither if r > 0.0 && s / r > 100.0 => return "(>100)".into(),
        Better::Neither if r > 0.0 => return format!("({:.2})", s / r),
        _ => return String::new(),
    };
    format!("{x:.2}x")
}

fn find<'a>(figures: &'a [Figure], scenario: &str, metric: &str) -> Option<&'a Figure> {
    figures
        .iter()
        .find(|f| f.scenario == scenario && f.metric == metric)
}

fn cell(f: Option<&Figure>) -> String {
    match f {
        Some(Figure { value: Some(v), .. }) => number(*v),
        Some(Figure { note: Some(_), .. }) => "n/a*".into(),
        _ => "-".into(),
    }
}

/// One row per (scenario, metric) in the order first seen: rnacos | shoal | ratio.
pub fn table(r: &CompareResult) -> String {
    let run_of = |k: TargetKind| r.runs.iter().find(|run| run.target == k);
    let rn = run_of(TargetKind::Rnacos);
    let sh = run_of(TargetKind::Shoal);
    let mut keys: Vec<(&'static str, String, &'static str, Better)> = Vec::new();
    for run in &r.runs {
        for f in &run.figures {
            if !keys.iter().any(|k| k.0 == f.scenario && k.1 == f.metric) {
                keys.push((f.scenario, f.metric.clone(), f.unit, f.better));
            }
        }
    }
    // Rows of a scenario together, scenarios in the order first seen.
    let mut order: Vec<&'static str> = Vec::new();
    for k in &keys {
        if !order.contains(&k.0) {
            order.push(k.0);
        }
    }
    keys.sort_by_key(|k| order.iter().position(|s| *s == k.0));
    let mut rows: Vec<[String; 6]> = vec![[
        "scenario".into(),
        "metric".into(),
        "unit".into(),
        "rnacos".into(),
        "shoal".into(),
        "shoal vs rnacos".into(),
    ]];
    let mut notes: Vec<String> = Vec::new();
    for (scenario, metric, unit, better) in &keys {
        let a = rn.and_then(|run| find(&run.figures, scenario, metric));
        let b = sh.and_then(|run| find(&run.figures, scenario, metric));
        for (name, f) in [("rnacos", a), ("shoal", b)] {
            if let Some(Figure {
                note: Some(note), ..
            }) = f
            {
                notes.push(format!("{name} {scenario} / {metric}: {note}"));
            }
        }
        rows.push([
            scenario.to_string(),
            metric.clone(),
            unit.to_string(),
            cell(a),
            cell(b),
            ratio(*better, a.and_then(|f| f.value), b.and_then(|f| f.value)),
        ]);
    }
    let widths: Vec<usize> = (0..6)
        .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    let m = &r.machine;
    let _ = writeln!(
        out,
        "compare on {} CPUs ({}), started {}, {} nodes per cluster \
         (each Shoal node {} worker threads, each rnacos node {} HTTP workers, \
         the load generator {} threads)",
        m.cpus,
        m.cpu_model,
        m.started_utc,
        r.nodes,
        r.shoal_worker_threads,
        r.rnacos_http_workers,
        r.load_generator_threads
    );
    for (i, row) in rows.iter().enumerate() {
        let mut line = String::new();
        for (c, text) in row.iter().enumerate() {
            let pad = widths[c] - text.chars().count();
            if c >= 3 {
                let _ = write!(line, "{}{text}  ", " ".repeat(pad));
            } else {
                let _ = write!(line, "{text}{}  ", " ".repeat(pad));
            }
        }
        let _ = writeln!(out, "{}", line.trim_end());
        if i == 0 {
            let total: usize = widths.iter().sum::<usize>() + 2 * 5;
            let _ = writeln!(out, "{}", "-".repeat(total));
        }
    }
    let _ = writeln!(
        out,
        "ratio: how many times better Shoal is (higher-is-better figures: shoal/rnacos; \
         lower-is-better: rnacos/shoal); in parentheses: shoal/rnacos of a context figure"
    );
    for n in notes {
        let _ = writeln!(out, "* {n}");
    }
    for run in &r.runs {
        if let Some(e) = &run.error {
            let _ = writeln!(out, "! {} stopped early: {e}", run.target.name());
        }
    }
    out
}

/// Horizontal position of a percentile: -log10(1 - p), so that p50, p90, p99 and
/// p99.9 are evenly spaced; the maximum is drawn at 3.5.
fn x_of(p: f64) -> f64 {
    if p >= 100.0 {
        3.5
    } else {
        -(1.0 - p / 100.0).log10()
    }
}

/// An SVG with one panel per scenario: latency (log scale) against percentile, one
/// line per target.
pub fn svg(r: &CompareResult) -> String {
    let mut scenarios: Vec<&str> = Vec::new();
    for run in &r.runs {
        for k in run.latencies.keys() {
            if !scenarios.contains(&k.as_str()) {
                scenarios.push(k);
            }
        }
    }
    let (pw, ph) = (460.0, 300.0);
    let (ml, mr, mt, mb) = (60.0, 20.0, 40.0, 45.0);
    let cols = 2usize;
    let rows = scenarios.len().div_ceil(cols).max(1);
    let (w, h) = (pw * cols as f64, ph * rows as f64 + 30.0);
    let mut out = String::new();
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="11">"#
    );
    let _ = writeln!(out, r#"<rect width="{w}" height="{h}" fill="white"/>"#);
    let _ = writeln!(
        out,
        r#"<text x="10" y="20" font-size="14">Latency distributions, rnacos (orange) and Shoal (blue), {} ({} CPUs)</text>"#,
        r.machine.started_utc, r.machine.cpus
    );
    for (i, scenario) in scenarios.iter().enumerate() {
        let ox = (i % cols) as f64 * pw;
        let oy = 30.0 + (i / cols) as f64 * ph;
        let curves: Vec<(TargetKind, &Latency)> = r
            .runs
            .iter()
            .filter_map(|run| Some((run.target, run.latencies.get(*scenario)?)))
            .filter(|(_, l)| l.count > 0)
            .collect();
        let values: Vec<f64> = curves
            .iter()
            .flat_map(|(_, l)| l.curve().into_iter().map(|(_, ms)| ms.max(0.01)))
            .collect();
        let lo = values.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = values.iter().copied().fold(0.0, f64::max);
        if values.is_empty() {
            continue;
        }
        let (y0, y1) = (
            lo.log10().floor(),
            hi.log10().ceil().max(lo.log10().floor() + 1.0),
        );
        let (iw, ih) = (pw - ml - mr, ph - mt - mb);
        let px = |x: f64| ox + ml + iw * x / 3.5;
        let py = |ms: f64| oy + mt + ih * (1.0 - (ms.max(0.01).log10() - y0) / (y1 - y0));
        let _ = writeln!(
            out,
            r#"<text x="{}" y="{}" font-size="13">{scenario}</text>"#,
            ox + ml,
            oy + mt - 12.0
        );
        let _ = writeln!(
            out,
            r##"<rect x="{}" y="{}" width="{iw}" height="{ih}" fill="none" stroke="#999"/>"##,
            ox + ml,
            oy + mt
        );
        let mut d = y0;
        while d <= y1 + 1e-9 {
            let ms = 10f64.powf(d);
            let y = py(ms);
            let _ = writeln!(
                out,
                r##"<line x1="{}" y1="{y}" x2="{}" y2="{y}" stroke="#eee"/><text x="{}" y="{}" text-anchor="end">{} ms</text>"##,
                ox + ml,
                ox + ml + iw,
                ox + ml - 4.0,
                y + 4.0,
                number(ms)
            );
            d += 1.0;
        }
        for (p, label) in [
            (0.0, "min"),
            (50.0, "p50"),
            (90.0, "p90"),
            (99.0, "p99"),
            (99.9, "p99.9"),
            (100.0, "max"),
        ] {
            let x = px(x_of(p));
            let _ = writeln!(
                out,
                r##"<line x1="{x}" y1="{}" x2="{x}" y2="{}" stroke="#eee"/><text x="{x}" y="{}" text-anchor="middle">{label}</text>"##,
                oy + mt,
                oy + mt + ih,
                oy + mt + ih + 14.0
            );
        }
        for (kind, l) in &curves {
            let color = match kind {
                TargetKind::Rnacos => "#e67e22",
                TargetKind::Shoal => "#2471a3",
            };
            let points: Vec<String> = l
                .curve()
                .into_iter()
                .map(|(p, ms)| format!("{:.1},{:.1}", px(x_of(p)), py(ms)))
                .collect();
            let _ = writeln!(
                out,
                r#"<polyline points="{}" fill="none" stroke="{color}" stroke-width="2"/>"#,
                points.join(" ")
            );
        }
        let _ = writeln!(
            out,
            r#"<text x="{}" y="{}" text-anchor="middle">percentile</text>"#,
            ox + ml + iw / 2.0,
            oy + mt + ih + 30.0
        );
    }
    out.push_str("</svg>\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers() {
        assert_eq!(number(9_412.4), "9 412");
        assert_eq!(number(1_234_567.0), "1 234 567");
        assert_eq!(number(140.0), "140");
        assert_eq!(number(12.345), "12.3");
        assert_eq!(number(1.234), "1.23");
        assert_eq!(number(0.0), "0");
    }

    #[test]
    fn ratios_follow_the_direction() {
        assert_eq!(ratio(Better::Higher, Some(10.0), Some(25.0)), "2.50x");
        assert_eq!(ratio(Better::Lower, Some(10.0), Some(4.0)), "2.50x");
        assert_eq!(ratio(Better::Lower, Some(2.0), Some(4.0)), "0.50x");
        assert_eq!(ratio(Better::Lower, Some(0.0), Some(0.0)), "=");
        assert_eq!(ratio(Better::Lower, Some(5.0), Some(0.0)), ">100x");
        assert_eq!(ratio(Better::Lower, Some(36.0), Some(0.0001)), ">100x");
        assert_eq!(ratio(Better::Neither, Some(2.0), Some(4.0)), "(2.00)");
        assert_eq!(ratio(Better::Neither, Some(3.7e-13), Some(0.27)), "(>100)");
        assert_eq!(ratio(Better::Higher, Some(1e-9), Some(5.0)), ">100x");
        assert_eq!(ratio(Better::Higher, None, Some(4.0)), "");
    }

    #[test]
    fn percentile_axis() {
        assert!((x_of(90.0) - 1.0).abs() < 1e-9);
        assert!((x_of(99.0) - 2.0).abs() < 1e-9);
        assert_eq!(x_of(0.0), 0.0);
        assert_eq!(x_of(100.0), 3.5);
    }
}
