//! Node addresses: `host:port` as users write them.

use std::net::SocketAddr;

use crate::error::{ClientError, Result};

/// Splits `host:port` into the host (without IPv6 brackets; it is also the TLS server
/// name) and the port. `[::1]:7400`, `10.0.0.1:7400` and `node-0.shoal:7400` are fine.
pub(crate) fn split_host_port(addr: &str) -> Result<(&str, u16)> {
    let bad = |why: &str| {
        ClientError::Config(format!(
            "invalid server address {addr:?}: {why} (expected host:port, e.g. 10.0.0.1:7400 or [::1]:7400)"
        ))
    };
    let (host, port) = addr.rsplit_once(':').ok_or_else(|| bad("no port"))?;
    let host = match host.strip_prefix('[') {
        Some(inner) => inner.strip_suffix(']').ok_or_else(|| bad("unclosed '['"))?,
        None if host.contains(':') => return Err(bad("IPv6 addresses need brackets")),
        None => host,
    };
    if host.is_empty() {
        return Err(bad("empty host"));
    }
    let port: u16 = port
        .parse()
        .map_err(|_| bad("port is not a number in 1..=65535"))?;
    if port == 0 {
        return Err(bad("port 0"));
    }
    Ok((host, port))
}

/// Resolves `host:port` to socket addresses (DNS for names), IPv4 first.
pub(crate) async fn resolve(addr: &str) -> Result<Vec<SocketAddr>> {
    let (host, port) = split_host_port(addr)?;
    let mut found: Vec<SocketAddr> = tokio::net::lookup_host((host, port))
        .await
        .map_err(|e| ClientError::Connect(format!("{addr}: cannot resolve: {e}")))?
        .collect();
    found.sort_by_key(|a| a.is_ipv6());
    found.dedup();
    if found.is_empty() {
        return Err(ClientError::Connect(format!(
            "{addr}: resolves to no address"
        )));
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_v4_v6_and_names() {
        assert_eq!(
            split_host_port("10.0.0.1:7400").unwrap(),
            ("10.0.0.1", 7400)
        );
        assert_eq!(split_host_port("[::1]:7400").unwrap(), ("::1", 7400));
        assert_eq!(
            split_host_port("node-0.shoal:1").unwrap(),
            ("node-0.shoal", 1)
        );
    }

    #[test]
    fn refuses_what_is_not_host_port() {
        for bad in [
            "",
            "10.0.0.1",
            "::1:7400",
            "[::1:7400",
            ":7400",
            "a:0",
            "a:65536",
            "a:x",
        ] {
            assert!(split_host_port(bad).is_err(), "{bad:?} should be refused");
        }
    }

    #[tokio::test]
    async fn resolves_literals_without_dns() {
        let v = resolve("127.0.0.1:7400").await.unwrap();
        assert_eq!(v, vec!["127.0.0.1:7400".parse().unwrap()]);
        let v = resolve("[::1]:7400").await.unwrap();
        assert_eq!(v, vec!["[::1]:7400".parse().unwrap()]);
    }
}
