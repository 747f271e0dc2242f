//! Validation of names, addresses, weights and metadata.
//!
//! Every check returns the first problem it finds as a [`StorageError`] whose message is
//! a one-liner saying what was wrong and what is allowed.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::net::IpAddr;

use crate::error::StorageError;
use crate::model::*;
use crate::registry::Limits;

/// Which kind of name is being validated (for the error message).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NameKind {
    /// A namespace.
    Namespace,
    /// A group.
    Group,
    /// A service.
    Service,
    /// A cluster.
    Cluster,
}

impl NameKind {
    /// The word used in error messages: "namespace", "group", "service", "cluster".
    pub fn as_str(self) -> &'static str {
        match self {
            NameKind::Namespace => "namespace",
            NameKind::Group => "group",
            NameKind::Service => "service",
            NameKind::Cluster => "cluster",
        }
    }
}

/// The characters a name may contain besides ASCII letters and digits.
const NAME_PUNCTUATION: &[u8] = b"-_.:@";

/// Whether each byte may be in a name: ASCII letters, digits and [`NAME_PUNCTUATION`]
/// (every name of every write is checked, on every node: a look-up per byte).
const NAME_BYTES: [bool; 256] = {
    let mut table = [false; 256];
    let mut b = 0;
    while b < 256 {
        table[b] = (b as u8).is_ascii_alphanumeric();
        b += 1;
    }
    let mut i = 0;
    while i < NAME_PUNCTUATION.len() {
        table[NAME_PUNCTUATION[i] as usize] = true;
        i += 1;
    }
    table
};

/// Longest excerpt of user input quoted in an error message, in bytes.
const QUOTE_MAX: usize = 64;

/// Quotes user input for an error message: escaped, and cut at [`QUOTE_MAX`] bytes.
pub(crate) fn quote(s: &str) -> String {
    if s.len() <= QUOTE_MAX {
        return format!("{s:?}");
    }
    let mut end = QUOTE_MAX;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{:?}...", &s[..end])
}

/// Whether the three names of a service key are non-empty and of allowed characters
/// only, their lengths aside: the longest one's length if so. A `ServiceKey` asks this
/// once, when it is made (see [`validate_service_key`]).
pub(crate) fn names_are_valid(parts: [&str; 3]) -> Option<usize> {
    let ok = parts
        .iter()
        .all(|p| !p.is_empty() && p.bytes().all(|b| NAME_BYTES[usize::from(b)]));
    ok.then(|| parts.iter().map(|p| p.len()).max().unwrap_or(0))
}

/// Checks a name: non-empty, at most `limits.max_name_len` bytes, and only the
/// characters documented in docs/protocol.md.
///
/// The allowed characters are the ASCII letters `A-Z` `a-z`, the digits `0-9`, and the
/// five punctuation characters `-` `_` `.` `:` `@`. Nothing else: no spaces, no `/`,
/// no non-ASCII. The set admits the usual Nacos service names, such as
/// `providers:com.foo.Bar:1.0:` (Dubbo) and `DEFAULT_GROUP@@orders` (a grouped name).
/// Names are case-sensitive.
pub fn validate_name(kind: NameKind, name: &str, limits: &Limits) -> Result<(), StorageError> {
    let what = kind.as_str();
    if name.is_empty() {
        return Err(StorageError::InvalidName {
            what,
            reason: format!("must not be empty (1..={} bytes)", limits.max_name_len),
        });
    }
    if name.len() > limits.max_name_len {
        return Err(StorageError::InvalidName {
            what,
            reason: format!(
                "{} is {} bytes long; at most {} bytes allowed",
                quote(name),
                name.len(),
                limits.max_name_len
            ),
        });
    }
    if let Some(at) = name.bytes().position(|b| !NAME_BYTES[usize::from(b)]) {
        // Every byte before is ASCII: `at` starts a character.
        let c = name[at..].chars().next().unwrap_or_default();
        return Err(StorageError::InvalidName {
            what,
            reason: format!(
                "{} has character {c:?} at byte {at}; only ASCII letters, digits and - _ . : @ are allowed",
                quote(name)
            ),
        });
    }
    Ok(())
}

/// Checks the three parts of a service key.
pub fn validate_service_key(key: &ServiceKey, limits: &Limits) -> Result<(), StorageError> {
    // The key judged its own characters when it was made: a key seen before (every
    // write of a service, on every node) is checked by its length alone.
    if key
        .longest_valid_part()
        .is_some_and(|n| n <= limits.max_name_len)
    {
        return Ok(());
    }
    validate_name(NameKind::Namespace, &key.namespace, limits)?;
    validate_name(NameKind::Group, &key.group, limits)?;
    validate_name(NameKind::Service, &key.service, limits)?;
    Ok(())
}

/// Checks an instance spec: cluster name, ip, port, weight, metadata, Ttl timings.
pub fn validate_instance(spec: &InstanceSpec, limits: &Limits) -> Result<(), StorageError> {
    validate_address(&spec.cluster, &spec.ip, spec.port, limits)?;
    validate_instance_settings(spec, limits)
}

/// Checks what an instance spec holds besides its address (see [`validate_instance`]).
pub(crate) fn validate_instance_settings(
    spec: &InstanceSpec,
    limits: &Limits,
) -> Result<(), StorageError> {
    validate_settings(spec.weight, &spec.metadata, spec.ttl.as_ref(), limits)
}

/// Checks what an instance holds besides its address: weight, metadata and lease.
fn validate_settings(
    weight: f64,
    metadata: &BTreeMap<String, String>,
    ttl: Option<&TtlLease>,
    limits: &Limits,
) -> Result<(), StorageError> {
    validate_weight(weight)?;
    validate_metadata("instance", metadata, limits)?;
    if let Some(ttl) = ttl {
        validate_ttl(ttl)?;
    }
    Ok(())
}

/// Checks an instance key: cluster name, ip and port.
pub fn validate_instance_key(key: &InstanceKey, limits: &Limits) -> Result<(), StorageError> {
    validate_address(&key.cluster, &key.ip, key.port, limits).map(|_| ())
}

/// Checks a service's settings: protection threshold in 0.0..=1.0 and bounded metadata.
pub fn validate_service_meta(meta: &ServiceMeta, limits: &Limits) -> Result<(), StorageError> {
    let t = meta.protect_threshold;
    if !(t.is_finite() && (0.0..=1.0).contains(&t)) {
        return Err(StorageError::InvalidSetting(format!(
            "protect_threshold {t}: must be a number in 0.0..=1.0"
        )));
    }
    validate_metadata("service", &meta.metadata, limits)
}

/// Checks an instance as it is held or replicated, except its address, which is its
/// key's and is checked with the key ([`validate_instance_key`]).
pub(crate) fn validate_instance_state(
    inst: &Instance,
    limits: &Limits,
) -> Result<(), StorageError> {
    let ttl = match &inst.lease {
        Lease::Ttl(ttl) => Some(ttl),
        Lease::Session(_) => None,
    };
    validate_settings(inst.weight, &inst.metadata, ttl, limits)
}

/// The canonical text of an IP address (as `IpAddr` displays it), so that `::1` and
/// `0:0::1` name the same instance: `ip` itself when it is canonical already (every
/// IPv4 address that parses is: the parser takes only four decimal octets without
/// leading zeros). Errors as [`validate_instance`] does on a bad ip.
pub(crate) fn canonical_ip(ip: &str) -> Result<Cow<'_, str>, StorageError> {
    canonical_addr(ip).map(|(_, text)| text)
}

/// The address `ip` names, parsed, and its canonical text (see [`canonical_ip`]): one
/// parse for both.
pub(crate) fn canonical_addr(ip: &str) -> Result<(IpAddr, Cow<'_, str>), StorageError> {
    match crate::compact::parse_ip(ip) {
        Some(a @ IpAddr::V4(_)) => Ok((a, Cow::Borrowed(ip))),
        Some(a) => {
            let text = a.to_string();
            Ok((
                a,
                if text == ip {
                    Cow::Borrowed(ip)
                } else {
                    Cow::Owned(text)
                },
            ))
        }
        None => Err(StorageError::InvalidIp(ip.to_string())),
    }
}

/// Checks an instance's cluster name, ip and port; returns the address parsed and its
/// canonical text.
pub(crate) fn validate_address<'a>(
    cluster: &str,
    ip: &'a str,
    port: u16,
    limits: &Limits,
) -> Result<(IpAddr, Cow<'a, str>), StorageError> {
    validate_name(NameKind::Cluster, cluster, limits)?;
    let addr = canonical_addr(ip)?;
    if port == 0 {
        return Err(StorageError::InvalidPort(0));
    }
    Ok(addr)
}

fn validate_weight(weight: f64) -> Result<(), StorageError> {
    if weight.is_finite() && (0.0..=10000.0).contains(&weight) {
        Ok(())
    } else {
        Err(StorageError::InvalidWeight(weight.to_string()))
    }
}

fn validate_ttl(ttl: &TtlLease) -> Result<(), StorageError> {
    if ttl.unhealthy_after_ms < 1 {
        return Err(StorageError::InvalidSetting(
            "ttl unhealthy_after_ms is 0: must be at least 1".to_string(),
        ));
    }
    if ttl.remove_after_ms < ttl.unhealthy_after_ms {
        return Err(StorageError::InvalidSetting(format!(
            "ttl remove_after_ms ({}) is below unhealthy_after_ms ({}): must be at least as long",
            ttl.remove_after_ms, ttl.unhealthy_after_ms
        )));
    }
    Ok(())
}

/// Checks a metadata map; `owner` ("instance" or "service") goes in the message.
fn validate_metadata(
    owner: &str,
    metadata: &BTreeMap<String, String>,
    limits: &Limits,
) -> Result<(), StorageError> {
    if metadata.len() > limits.max_metadata_entries {
        return Err(StorageError::InvalidMetadata(format!(
            "{owner} metadata has {} entries; at most {} allowed",
            metadata.len(),
            limits.max_metadata_entries
        )));
    }
    for (k, v) in metadata {
        if k.is_empty() {
            return Err(StorageError::InvalidMetadata(format!(
                "{owner} metadata has an empty key; keys must be 1..={} bytes",
                limits.max_metadata_key_len
            )));
        }
        if k.len() > limits.max_metadata_key_len {
            return Err(StorageError::InvalidMetadata(format!(
                "{owner} metadata key {} is {} bytes; at most {} allowed",
                quote(k),
                k.len(),
                limits.max_metadata_key_len
            )));
        }
        if v.len() > limits.max_metadata_value_len {
            return Err(StorageError::InvalidMetadata(format!(
                "{owner} metadata value of key {} is {} bytes; at most {} allowed",
                quote(k),
                v.len(),
                limits.max_metadata_value_len
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lim() -> Limits {
        Limits::default()
    }

    fn small() -> Limits {
        Limits {
            max_name_len: 8,
            max_metadata_entries: 2,
            max_metadata_key_len: 4,
            max_metadata_value_len: 6,
        }
    }

    fn name_err(kind: NameKind, name: &str, limits: &Limits) -> (&'static str, String) {
        match validate_name(kind, name, limits) {
            Err(StorageError::InvalidName { what, reason }) => (what, reason),
            other => panic!("expected InvalidName for {name:?}, got {other:?}"),
        }
    }

    #[test]
    fn good_names() {
        for n in [
            "public",
            "DEFAULT_GROUP",
            "providers:com.foo.Bar:1.0:",
            "DEFAULT_GROUP@@orders",
            "a",
            "my-svc_v2.1",
            "0",
        ] {
            validate_name(NameKind::Service, n, &lim()).unwrap();
        }
        let max = "x".repeat(128);
        validate_name(NameKind::Service, &max, &lim()).unwrap();
    }

    #[test]
    fn empty_name() {
        let (what, reason) = name_err(NameKind::Group, "", &lim());
        assert_eq!(what, "group");
        assert!(reason.contains("empty"), "{reason}");
    }

    #[test]
    fn long_name() {
        let (what, reason) = name_err(NameKind::Namespace, "abcdefghi", &small());
        assert_eq!(what, "namespace");
        assert!(
            reason.contains("9 bytes") && reason.contains("at most 8"),
            "{reason}"
        );
        let (_, reason) = name_err(NameKind::Service, &"y".repeat(129), &lim());
        assert!(reason.contains("..."), "long input is cut: {reason}");
    }

    #[test]
    fn bad_characters() {
        for (n, c) in [
            ("a b", ' '),
            ("a/b", '/'),
            ("é", 'é'),
            ("a\nb", '\n'),
            ("a#", '#'),
            ("a*", '*'),
        ] {
            let (what, reason) = name_err(NameKind::Cluster, n, &lim());
            assert_eq!(what, "cluster");
            assert!(reason.contains(&format!("{c:?}")), "{reason}");
            assert!(reason.contains("- _ . : @"), "{reason}");
        }
        // The message is one line even for a control character.
        let err = validate_name(NameKind::Service, "a\nb", &lim()).unwrap_err();
        assert!(!err.to_string().contains('\n'), "{err}");
    }

    #[test]
    fn service_key_parts() {
        let l = lim();
        validate_service_key(&ServiceKey::named("orders"), &l).unwrap();
        let what = |k: ServiceKey| match validate_service_key(&k, &l) {
            Err(StorageError::InvalidName { what, .. }) => what,
            other => panic!("{other:?}"),
        };
        assert_eq!(what(ServiceKey::new("", "g", "s")), "namespace");
        assert_eq!(what(ServiceKey::new("n", "g/", "s")), "group");
        assert_eq!(what(ServiceKey::new("n", "g", "")), "service");
    }

    /// A key judges its characters once, when it is made; the limits still judge its
    /// length on every check, and a refused key gets the full check's error.
    #[test]
    fn a_service_key_is_judged_as_each_of_its_names_is() {
        for limits in [lim(), small()] {
            for (ns, g, s) in [
                ("public", "DEFAULT_GROUP", "orders"),
                ("ns", "g", "12345678"),
                ("ns", "g", "123456789"),
                ("123456789", "g", "s"),
                ("ns", "g", &"x".repeat(lim().max_name_len)),
                ("ns", "g", &"x".repeat(lim().max_name_len + 1)),
                ("ns", "g/", "s"),
                ("ns", "g", "é"),
                ("", "g", "s"),
                ("a b", "g", "s"),
            ] {
                let alone = validate_name(NameKind::Namespace, ns, &limits)
                    .and_then(|()| validate_name(NameKind::Group, g, &limits))
                    .and_then(|()| validate_name(NameKind::Service, s, &limits));
                let key = ServiceKey::new(ns, g, s);
                assert_eq!(
                    validate_service_key(&key, &limits).map_err(|e| e.to_string()),
                    alone.map_err(|e| e.to_string()),
                    "{key}"
                );
            }
        }
    }

    #[test]
    fn instance_ok() {
        let mut s = InstanceSpec::new("10.0.0.1", 8080);
        validate_instance(&s, &lim()).unwrap();
        s.ip = "::1".into();
        s.weight = 0.0;
        validate_instance(&s, &lim()).unwrap();
        s.weight = 10000.0;
        s.port = 65535;
        s.ttl = Some(TtlLease {
            unhealthy_after_ms: 1,
            remove_after_ms: 1,
        });
        validate_instance(&s, &lim()).unwrap();
    }

    #[test]
    fn instance_bad_cluster() {
        let mut s = InstanceSpec::new("10.0.0.1", 8080);
        s.cluster = "".into();
        assert!(matches!(
            validate_instance(&s, &lim()),
            Err(StorageError::InvalidName {
                what: "cluster",
                ..
            })
        ));
    }

    #[test]
    fn instance_bad_ip() {
        for ip in [
            "",
            "10.0.0",
            "10.0.0.256",
            "host.example",
            "::g",
            " 10.0.0.1",
        ] {
            let s = InstanceSpec::new(ip, 80);
            assert_eq!(
                validate_instance(&s, &lim()),
                Err(StorageError::InvalidIp(ip.to_string()))
            );
        }
    }

    #[test]
    fn instance_bad_port() {
        let s = InstanceSpec::new("10.0.0.1", 0);
        assert_eq!(
            validate_instance(&s, &lim()),
            Err(StorageError::InvalidPort(0))
        );
    }

    #[test]
    fn instance_bad_weight() {
        for w in [-0.5, 10000.5, f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
            let mut s = InstanceSpec::new("10.0.0.1", 1);
            s.weight = w;
            assert_eq!(
                validate_instance(&s, &lim()),
                Err(StorageError::InvalidWeight(w.to_string()))
            );
        }
    }

    #[test]
    fn instance_bad_metadata() {
        let l = small();
        let bad = |pairs: &[(&str, &str)]| {
            let mut s = InstanceSpec::new("10.0.0.1", 1);
            s.metadata = pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            match validate_instance(&s, &l) {
                Err(StorageError::InvalidMetadata(m)) => m,
                other => panic!("{other:?}"),
            }
        };
        let m = bad(&[("a", ""), ("b", ""), ("c", "")]);
        assert!(m.contains("3 entries") && m.contains("at most 2"), "{m}");
        let m = bad(&[("", "v")]);
        assert!(m.contains("empty key"), "{m}");
        let m = bad(&[("abcde", "v")]);
        assert!(m.contains("\"abcde\"") && m.contains("at most 4"), "{m}");
        let m = bad(&[("k", "1234567")]);
        assert!(m.contains("\"k\"") && m.contains("at most 6"), "{m}");

        // At the limits is fine.
        let mut s = InstanceSpec::new("10.0.0.1", 1);
        s.metadata.insert("abcd".into(), "123456".into());
        s.metadata.insert("x".into(), "".into());
        validate_instance(&s, &l).unwrap();
    }

    #[test]
    fn instance_bad_ttl() {
        let mut s = InstanceSpec::new("10.0.0.1", 1);
        s.ttl = Some(TtlLease {
            unhealthy_after_ms: 0,
            remove_after_ms: 10,
        });
        assert!(matches!(
            validate_instance(&s, &lim()),
            Err(StorageError::InvalidSetting(m)) if m.contains("unhealthy_after_ms")
        ));
        s.ttl = Some(TtlLease {
            unhealthy_after_ms: 10,
            remove_after_ms: 9,
        });
        assert!(matches!(
            validate_instance(&s, &lim()),
            Err(StorageError::InvalidSetting(m)) if m.contains("remove_after_ms")
        ));
    }

    #[test]
    fn instance_key() {
        let k = |c: &str, ip: &str, port| InstanceKey {
            cluster: c.into(),
            ip: ip.into(),
            port,
        };
        validate_instance_key(&k("DEFAULT", "1.2.3.4", 1), &lim()).unwrap();
        assert!(matches!(
            validate_instance_key(&k("a b", "1.2.3.4", 1), &lim()),
            Err(StorageError::InvalidName {
                what: "cluster",
                ..
            })
        ));
        assert_eq!(
            validate_instance_key(&k("DEFAULT", "x", 1), &lim()),
            Err(StorageError::InvalidIp("x".into()))
        );
        assert_eq!(
            validate_instance_key(&k("DEFAULT", "1.2.3.4", 0), &lim()),
            Err(StorageError::InvalidPort(0))
        );
    }

    #[test]
    fn canonical_ips() {
        assert_eq!(canonical_ip("0:0:0:0:0:0:0:1").unwrap(), "::1");
        assert_eq!(canonical_ip("FE80::1").unwrap(), "fe80::1");
        assert_eq!(canonical_ip("10.0.0.1").unwrap(), "10.0.0.1");
        assert!(matches!(
            canonical_ip("10.0.0.1").unwrap(),
            Cow::Borrowed(_)
        ));
        assert!(matches!(canonical_ip("fe80::1").unwrap(), Cow::Borrowed(_)));
        // Other spellings of an IPv4 address do not parse, so a parsed one is canonical.
        for ip in [
            "010.0.0.1",
            "10.0.0.01",
            "10.1",
            "167772161",
            "0x0a.0.0.1",
            " 10.0.0.1",
        ] {
            assert!(canonical_ip(ip).is_err(), "{ip}");
        }
    }

    #[test]
    fn service_meta() {
        let l = small();
        validate_service_meta(&ServiceMeta::default(), &l).unwrap();
        for t in [0.0, 0.5, 1.0] {
            let m = ServiceMeta {
                protect_threshold: t,
                ..Default::default()
            };
            validate_service_meta(&m, &l).unwrap();
        }
        for t in [-0.1, 1.01, f64::NAN, f64::INFINITY] {
            let m = ServiceMeta {
                protect_threshold: t,
                ..Default::default()
            };
            assert!(matches!(
                validate_service_meta(&m, &l),
                Err(StorageError::InvalidSetting(s)) if s.contains("protect_threshold")
            ));
        }
        let mut m = ServiceMeta::default();
        m.metadata.insert("toolong".into(), "v".into());
        assert!(matches!(
            validate_service_meta(&m, &l),
            Err(StorageError::InvalidMetadata(s)) if s.contains("service metadata key \"toolong\"")
        ));
    }

    #[test]
    fn messages_are_one_line_and_readable() {
        let e = validate_instance(&InstanceSpec::new("10.0.0.1", 0), &lim()).unwrap_err();
        assert_eq!(e.to_string(), "invalid port 0: must be 1..=65535");
        let e = validate_name(NameKind::Service, "a/b", &lim()).unwrap_err();
        assert_eq!(
            e.to_string(),
            "invalid service: \"a/b\" has character '/' at byte 1; only ASCII letters, digits and - _ . : @ are allowed"
        );
        // A character of several bytes is named whole, at the byte it starts at.
        let e = validate_name(NameKind::Group, "ab-é", &lim()).unwrap_err();
        assert!(
            e.to_string().contains("has character 'é' at byte 3;"),
            "{e}"
        );
        // Every byte is judged: each allowed one alone passes, every other fails.
        for b in 0..=255u8 {
            let allowed = b.is_ascii_alphanumeric() || NAME_PUNCTUATION.contains(&b);
            let name = String::from_utf8_lossy(&[b]).into_owned();
            assert_eq!(
                validate_name(NameKind::Cluster, &name, &lim()).is_ok(),
                allowed,
                "byte {b:#x}"
            );
        }
    }
}
