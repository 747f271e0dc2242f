//! Network namespaces for real partitions.
//!
//! Each node gets a namespace `shoal-chaos-<pid>-<k>-<i>` whose address
//! `10.77.<s>.<i+1>/32` sits on its loopback. The namespaces are joined by a full mesh
//! of veth pairs (one per pair of nodes, with a /32 route each way), and each has one
//! more veth to the root namespace, where the test process reaches every node from
//! `10.77.<s>.254`. No packet is ever forwarded by the root namespace, so the host's
//! firewall (a Docker host drops bridged traffic in FORWARD) plays no part. `<s>` is a
//! subnet no other interface on the machine uses, so two runs never collide.
//!
//! A partition is a set of `iptables` DROP rules inside the namespaces of the nodes
//! (INPUT from and OUTPUT to the nodes of the other sides): datagrams vanish, nobody
//! gets a reset or an ICMP error, exactly like a cut cable. The root namespace is not
//! cut, so the harness keeps observing both sides.
//!
//! Everything is deleted on drop (the veths go with their namespaces). Leftovers of a
//! run that was killed (its pid is gone) are deleted by the next run.

use std::net::Ipv4Addr;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

/// One network namespace per node, meshed by veth pairs.
#[derive(Debug)]
pub struct NetLab {
    subnet: u8,
    namespaces: Vec<String>,
}

fn sh(program: &str, args: &[&str]) -> Result<String, String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|e| format!("cannot run {program}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "{program} {} failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn ip(args: &[&str]) -> Result<String, String> {
    sh("ip", args)
}

/// `ip <args>` inside namespace `ns`.
fn in_ns(ns: &str, args: &[&str]) -> Result<String, String> {
    let mut all = vec!["-n", ns];
    all.extend_from_slice(args);
    sh("ip", &all)
}

impl NetLab {
    /// Why network namespaces cannot be used here, if they cannot.
    pub fn unavailable() -> Option<String> {
        let uid = sh("id", &["-u"]).unwrap_or_default();
        if uid.trim() != "0" {
            return Some(format!(
                "network namespaces need root (uid is {})",
                uid.trim()
            ));
        }
        for tool in ["ip", "iptables"] {
            if sh("sh", &["-c", &format!("command -v {tool}")]).is_err() {
                return Some(format!("`{tool}` is not installed"));
            }
        }
        None
    }

    /// Creates `n` namespaces, meshed, each reachable from the root namespace.
    pub fn create(n: usize) -> Result<NetLab, String> {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        if let Some(why) = Self::unavailable() {
            return Err(why);
        }
        Self::sweep_leftovers();
        let pid = std::process::id();
        let k = COUNTER.fetch_add(1, Ordering::Relaxed);
        let tag = format!("{:05}{:02}", pid % 100_000, k % 100);
        let subnet = Self::free_subnet(pid, k)?;
        let mut lab = NetLab {
            subnet,
            namespaces: Vec::new(),
        };
        let host_ip = format!("10.77.{subnet}.254");
        // On error, `lab` is dropped and deletes what was made so far.
        for i in 0..n {
            let ns = format!("shoal-chaos-{pid}-{k}-{i}");
            ip(&["netns", "add", &ns])?;
            lab.namespaces.push(ns.clone());
            let me = lab.ip(i).to_string();
            in_ns(&ns, &["link", "set", "lo", "up"])?;
            in_ns(&ns, &["addr", "add", &format!("{me}/32"), "dev", "lo"])?;
            // The link to the root namespace.
            let host = format!("sr{tag}{i:x}");
            let inner = format!("ir{tag}{i:x}");
            ip(&["link", "add", &host, "type", "veth", "peer", "name", &inner])?;
            ip(&["link", "set", &inner, "netns", &ns])?;
            ip(&["addr", "add", &format!("{host_ip}/32"), "dev", &host])?;
            ip(&["link", "set", &host, "up"])?;
            ip(&["route", "add", &format!("{me}/32"), "dev", &host])?;
            in_ns(&ns, &["link", "set", &inner, "up"])?;
            in_ns(
                &ns,
                &["route", "add", &format!("{host_ip}/32"), "dev", &inner],
            )?;
        }
        // The mesh between nodes.
        for i in 0..n {
            for j in i + 1..n {
                let a = format!("m{tag}{i:x}{j:x}");
                let b = format!("m{tag}{j:x}{i:x}");
                ip(&["link", "add", &a, "type", "veth", "peer", "name", &b])?;
                ip(&["link", "set", &a, "netns", &lab.namespaces[i]])?;
                ip(&["link", "set", &b, "netns", &lab.namespaces[j]])?;
                let (ns_i, ns_j) = (&lab.namespaces[i], &lab.namespaces[j]);
                in_ns(ns_i, &["link", "set", &a, "up"])?;
                in_ns(ns_j, &["link", "set", &b, "up"])?;
                in_ns(
                    ns_i,
                    &["route", "add", &format!("{}/32", lab.ip(j)), "dev", &a],
                )?;
                in_ns(
                    ns_j,
                    &["route", "add", &format!("{}/32", lab.ip(i)), "dev", &b],
                )?;
            }
        }
        Ok(lab)
    }

    /// A /24 under 10.77.0.0/16 that no interface uses.
    fn free_subnet(pid: u32, k: u32) -> Result<u8, String> {
        let used = ip(&["-o", "-4", "addr", "show"])?;
        let start = (pid.wrapping_mul(7).wrapping_add(k) % 250) as u8;
        for step in 0..250u8 {
            let s = (start.wrapping_add(step) % 250) + 1;
            if !used.contains(&format!("10.77.{s}.")) {
                return Ok(s);
            }
        }
        Err("no free 10.77.x.0/24 subnet".into())
    }

    /// Deletes namespaces and bridges of earlier runs whose process is gone.
    fn sweep_leftovers() {
        let Ok(list) = ip(&["netns", "list"]) else {
            return;
        };
        for line in list.lines() {
            let name = line.split_whitespace().next().unwrap_or("");
            let Some(rest) = name.strip_prefix("shoal-chaos-") else {
                continue;
            };
            let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
                continue;
            };
            if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
                let _ = ip(&["netns", "del", name]);
            }
        }
    }

    /// Node `i`'s address.
    pub fn ip(&self, i: usize) -> Ipv4Addr {
        Ipv4Addr::new(10, 77, self.subnet, (i + 1) as u8)
    }

    /// Node `i`'s namespace.
    pub fn namespace(&self, i: usize) -> &str {
        &self.namespaces[i]
    }

    /// Cuts the network between the groups: each node drops every packet from and to
    /// the nodes of other groups. Nodes in no group are cut from everyone.
    pub fn partition(&self, groups: &[Vec<usize>]) -> Result<(), String> {
        self.heal()?;
        let group_of = |i: usize| groups.iter().position(|g| g.contains(&i));
        for i in 0..self.namespaces.len() {
            let mut rules = String::from("*filter\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n");
            for j in 0..self.namespaces.len() {
                if i == j || (group_of(i).is_some() && group_of(i) == group_of(j)) {
                    continue;
                }
                let other = self.ip(j);
                rules.push_str(&format!("-A INPUT -s {other}/32 -j DROP\n"));
                rules.push_str(&format!("-A OUTPUT -d {other}/32 -j DROP\n"));
            }
            rules.push_str("COMMIT\n");
            self.restore(i, &rules)?;
        }
        Ok(())
    }

    /// Removes every cut.
    pub fn heal(&self) -> Result<(), String> {
        for i in 0..self.namespaces.len() {
            self.restore(
                i,
                "*filter\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\nCOMMIT\n",
            )?;
        }
        Ok(())
    }

    /// Loads a filter table into namespace `i` atomically (`iptables-restore`).
    fn restore(&self, i: usize, rules: &str) -> Result<(), String> {
        use std::io::Write;
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.namespaces[i], "iptables-restore"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot run iptables-restore: {e}"))?;
        child
            .stdin
            .take()
            .expect("stdin was piped")
            .write_all(rules.as_bytes())
            .map_err(|e| format!("writing iptables rules: {e}"))?;
        let out = child
            .wait_with_output()
            .map_err(|e| format!("iptables-restore: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "iptables-restore in {} failed: {}",
                self.namespaces[i],
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    }
}

impl Drop for NetLab {
    fn drop(&mut self) {
        // Every veth has an end in one of these: deleting them deletes the links.
        for ns in &self.namespaces {
            let _ = ip(&["netns", "del", ns]);
        }
    }
}
