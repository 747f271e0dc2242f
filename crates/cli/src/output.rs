//! How results are shown: aligned plain tables for people, JSON for programs.

use std::collections::BTreeMap;
use std::time::{SystemTime, UNIX_EPOCH};

use shoal_client::{ServiceSummary, ServiceView};

/// A plain table: a header row and rows of cells, columns padded to their widest cell
/// and separated by two spaces (the last column is not padded).
pub(crate) fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if i < widths.len() {
                widths[i] = widths[i].max(cell.chars().count());
            }
        }
    }
    let mut out = String::new();
    let mut line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut s = String::new();
        for (i, cell) in cells.enumerate() {
            if i > 0 {
                s.push_str("  ");
            }
            s.push_str(cell);
            if i + 1 < widths.len() {
                let pad = widths[i].saturating_sub(cell.chars().count());
                s.extend(std::iter::repeat_n(' ', pad));
            }
        }
        out.push_str(s.trim_end());
        out.push('\n');
    };
    line(&mut header.iter().copied());
    for row in rows {
        line(&mut row.iter().map(String::as_str));
    }
    out
}

/// Metadata as `k=v,k=v`, or `-` when there is none.
pub(crate) fn metadata(m: &BTreeMap<String, String>) -> String {
    if m.is_empty() {
        return "-".to_string();
    }
    m.iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// The instances of a view as a table.
pub(crate) fn instances_table(view: &ServiceView) -> String {
    let rows: Vec<Vec<String>> = view
        .instances
        .iter()
        .map(|i| {
            vec![
                i.cluster.clone(),
                i.ip.clone(),
                i.port.to_string(),
                i.weight.to_string(),
                i.healthy.to_string(),
                i.enabled.to_string(),
                metadata(&i.metadata),
            ]
        })
        .collect();
    table(
        &[
            "CLUSTER", "IP", "PORT", "WEIGHT", "HEALTHY", "ENABLED", "METADATA",
        ],
        &rows,
    )
}

/// The line under an instance table: revision, count, and whether protection applied.
pub(crate) fn view_summary(view: &ServiceView) -> String {
    let n = view.instances.len();
    let protection = if view.protected {
        "protection threshold reached: unhealthy instances included"
    } else {
        "protection not applied"
    };
    format!(
        "{}: revision {}, {} instance{}, {}",
        view.key,
        view.revision,
        n,
        if n == 1 { "" } else { "s" },
        protection
    )
}

/// The services of a listing as a table.
pub(crate) fn services_table(services: &[ServiceSummary]) -> String {
    let rows: Vec<Vec<String>> = services
        .iter()
        .map(|s| {
            vec![
                s.key.namespace.clone(),
                s.key.group.clone(),
                s.key.service.clone(),
                s.instances.to_string(),
                s.healthy.to_string(),
            ]
        })
        .collect();
    table(
        &["NAMESPACE", "GROUP", "SERVICE", "INSTANCES", "HEALTHY"],
        &rows,
    )
}

/// The current time as RFC 3339 in UTC with milliseconds.
pub(crate) fn now_rfc3339() -> String {
    let since = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    rfc3339(since.as_millis() as i64)
}

/// Milliseconds since the Unix epoch as `YYYY-MM-DDTHH:MM:SS.mmmZ`.
pub(crate) fn rfc3339(unix_ms: i64) -> String {
    let secs = unix_ms.div_euclid(1000);
    let ms = unix_ms.rem_euclid(1000);
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{ms:03}Z",
        sod / 3600,
        sod % 3600 / 60,
        sod % 60
    )
}

/// Days since 1970-01-01 to (year, month, day) in the proleptic Gregorian calendar
/// (Howard Hinnant's `civil_from_days`).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// Prints a value as one line of JSON.
pub(crate) fn print_json(value: &impl serde::Serialize) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string(value)?);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_are_aligned() {
        let t = table(
            &["A", "LONGER", "C"],
            &[
                vec!["xxxx".into(), "y".into(), "z".into()],
                vec!["x".into(), "yy".into(), "last column not padded".into()],
            ],
        );
        assert_eq!(
            t,
            "A     LONGER  C\nxxxx  y       z\nx     yy      last column not padded\n"
        );
    }

    #[test]
    fn timestamps() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(951_782_400_123), "2000-02-29T00:00:00.123Z");
        assert_eq!(rfc3339(1_767_225_599_999), "2025-12-31T23:59:59.999Z");
    }

    #[test]
    fn metadata_cell() {
        let mut m = BTreeMap::new();
        assert_eq!(metadata(&m), "-");
        m.insert("b".into(), "2".into());
        m.insert("a".into(), "1".into());
        assert_eq!(metadata(&m), "a=1,b=2");
    }
}
