//! CPU time and memory of a process, read from `/proc` (Linux only; elsewhere every
//! reading is `None` and the report says "n/a").

use std::sync::OnceLock;

/// Clock ticks per second of `utime`/`stime` in `/proc/<pid>/stat`: `getconf CLK_TCK`,
/// or 100 (the value on every common Linux) when that cannot be run.
fn clock_ticks() -> f64 {
    static TICKS: OnceLock<f64> = OnceLock::new();
    *TICKS.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse::<f64>().ok())
            .filter(|t| *t > 0.0)
            .unwrap_or(100.0)
    })
}

/// User plus system CPU seconds the process has used so far.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_cpu_ticks(&stat).map(|ticks| ticks as f64 / clock_ticks())
}

/// `utime + stime` from the text of `/proc/<pid>/stat`. The command name (field 2) is
/// in parentheses and may contain spaces, so fields are counted after the last `)`:
/// there, index 0 is field 3 (state), so utime (field 14) is index 11 and stime index 12.
fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// CPU seconds the whole machine spent busy (every CPU, every state but idle and
/// iowait) since boot, from the first line of /proc/stat.
pub fn machine_busy_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    parse_machine_busy_ticks(&stat).map(|ticks| ticks as f64 / clock_ticks())
}

/// `cpu  user nice system idle iowait irq softirq steal guest guest_nice`: busy is
/// user + nice + system + irq + softirq + steal (guest time is already in user).
fn parse_machine_busy_ticks(stat: &str) -> Option<u64> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|f| f.parse().ok())
        .collect::<Option<_>>()?;
    let at = |i: usize| v.get(i).copied().unwrap_or(0);
    Some(at(0) + at(1) + at(2) + at(5) + at(6) + at(7))
}

/// CPU seconds the hypervisor gave this machine's virtual CPUs to others while they
/// had work (`steal` in /proc/stat) since boot. Part of [`machine_busy_seconds`]: on a
/// shared host it is what slows a run down without any process here using the CPU.
pub fn machine_steal_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    parse_machine_steal_ticks(&stat).map(|ticks| ticks as f64 / clock_ticks())
}

/// The eighth field of the `cpu ` line (0 on a kernel too old to count it).
fn parse_machine_steal_ticks(stat: &str) -> Option<u64> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let field = line.split_whitespace().nth(8);
    match field {
        Some(f) => f.parse().ok(),
        None => Some(0),
    }
}

/// Resident set size in bytes (`VmRSS` of `/proc/<pid>/status`).
pub fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    parse_status_kib(&status, "VmRSS:").map(|kib| kib * 1024)
}

fn parse_status_kib(status: &str, field: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with(field))?;
    line[field.len()..].split_whitespace().next()?.parse().ok()
}

/// Bytes received on the loopback interface since boot (`lo` in /proc/net/dev). On
/// loopback every byte sent is also received, so this counts each byte once; it
/// covers every process that talks over loopback, not only the ones measured.
pub fn loopback_bytes() -> Option<u64> {
    let dev = std::fs::read_to_string("/proc/net/dev").ok()?;
    parse_netdev_rx(&dev, "lo")
}

fn parse_netdev_rx(dev: &str, iface: &str) -> Option<u64> {
    dev.lines().find_map(|l| {
        let (name, rest) = l.split_once(':')?;
        (name.trim() == iface).then(|| rest.split_whitespace().next()?.parse().ok())?
    })
}

/// UDP datagrams the whole machine dropped because a socket's receive buffer was full,
/// since boot: `RcvbufErrors` of IPv4 (/proc/net/snmp) plus IPv6 (/proc/net/snmp6).
/// On loopback every such drop is a datagram that a node or the load generator sent
/// and then had to recover (QUIC probes and retransmits it), so the benchmark reports
/// them: a run with drops measures that recovery too.
pub fn udp_receive_buffer_drops() -> Option<u64> {
    let v4 = parse_snmp_udp_rcvbuf_errors(&std::fs::read_to_string("/proc/net/snmp").ok()?)?;
    let v6 = std::fs::read_to_string("/proc/net/snmp6")
        .ok()
        .and_then(|s| parse_snmp6_counter(&s, "Udp6RcvbufErrors"))
        .unwrap_or(0);
    Some(v4 + v6)
}

/// `RcvbufErrors` of the two `Udp:` lines of /proc/net/snmp (names, then values).
fn parse_snmp_udp_rcvbuf_errors(snmp: &str) -> Option<u64> {
    let mut lines = snmp.lines().filter(|l| l.starts_with("Udp:"));
    let names = lines.next()?;
    let values = lines.next()?;
    let at = names.split_whitespace().position(|n| n == "RcvbufErrors")?;
    values.split_whitespace().nth(at)?.parse().ok()
}

/// A `name value` line of /proc/net/snmp6.
fn parse_snmp6_counter(snmp6: &str, name: &str) -> Option<u64> {
    snmp6.lines().find_map(|l| {
        let mut f = l.split_whitespace();
        (f.next()? == name).then(|| f.next()?.parse().ok())?
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_ticks_skip_a_command_name_with_spaces() {
        let stat = "1234 (shoal (x) y) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 4";
        assert_eq!(parse_cpu_ticks(stat), Some(300));
        assert_eq!(parse_cpu_ticks("garbage"), None);
    }

    #[test]
    fn machine_busy_leaves_out_idle_and_iowait() {
        let stat = "cpu  100 1 20 5000 7 2 3 4 0 0\ncpu0 50 0 10 2500 3 1 1 2 0 0\n";
        assert_eq!(parse_machine_busy_ticks(stat), Some(130));
        assert_eq!(parse_machine_busy_ticks("intr 1 2 3"), None);
    }

    #[test]
    fn machine_steal_is_the_eighth_field() {
        let stat = "cpu  100 1 20 5000 7 2 3 4 0 0\ncpu0 50 0 10 2500 3 1 1 2 0 0\n";
        assert_eq!(parse_machine_steal_ticks(stat), Some(4));
        assert_eq!(
            parse_machine_steal_ticks("cpu  100 1 20 5000 7 2 3\n"),
            Some(0)
        );
        assert_eq!(
            parse_machine_steal_ticks("cpu  100 1 20 5000 7 2 3 x\n"),
            None
        );
        assert_eq!(parse_machine_steal_ticks("intr 1 2 3"), None);
    }

    #[test]
    fn rss_is_read_in_kib() {
        let status = "Name:\tshoal\nVmPeak:\t  9999 kB\nVmRSS:\t   20480 kB\n";
        assert_eq!(parse_status_kib(status, "VmRSS:"), Some(20480));
        assert_eq!(parse_status_kib(status, "VmHWM:"), None);
    }

    #[test]
    fn loopback_counter() {
        let dev = "Inter-|   Receive\n face |bytes    packets\n    lo: 1343   22 0 0 0 0 0 0 1343 22 0 0 0 0 0 0\n  eth0: 5 1 0 0 0 0 0 0 7 1 0 0 0 0 0 0\n";
        assert_eq!(parse_netdev_rx(dev, "lo"), Some(1343));
        assert_eq!(parse_netdev_rx(dev, "eth0"), Some(5));
        assert_eq!(parse_netdev_rx(dev, "wlan0"), None);
    }

    #[test]
    fn udp_receive_buffer_drops_are_found_by_name() {
        let snmp = "Ip: Forwarding DefaultTTL\nIp: 1 64\n\
                    Udp: InDatagrams NoPorts InErrors OutDatagrams RcvbufErrors SndbufErrors\n\
                    Udp: 10170980 623 3183018 13362402 3183017 0\n\
                    UdpLite: InDatagrams NoPorts InErrors OutDatagrams RcvbufErrors\n\
                    UdpLite: 0 0 0 0 9\n";
        assert_eq!(parse_snmp_udp_rcvbuf_errors(snmp), Some(3183017));
        assert_eq!(
            parse_snmp_udp_rcvbuf_errors("Udp: InDatagrams\nUdp: 5\n"),
            None
        );
        assert_eq!(parse_snmp_udp_rcvbuf_errors("Ip: 1\n"), None);
        let snmp6 = "Udp6InErrors                    \t7\nUdp6RcvbufErrors                \t3\nUdpLite6RcvbufErrors\t1\n";
        assert_eq!(parse_snmp6_counter(snmp6, "Udp6RcvbufErrors"), Some(3));
        assert_eq!(parse_snmp6_counter(snmp6, "Udp6SndbufErrors"), None);
        if cfg!(target_os = "linux") {
            assert!(udp_receive_buffer_drops().is_some());
        }
    }

    #[test]
    fn this_process_is_readable_on_linux() {
        if cfg!(target_os = "linux") {
            let me = std::process::id();
            assert!(cpu_seconds(me).is_some());
            assert!(rss_bytes(me).is_some_and(|b| b > 0));
        }
    }
}
