//! Options shared by the client commands, and parsing of what users type.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;

use clap::Args;
use shoal_client::{Client, ClientConfig, ServiceKey, DEFAULT_GROUP, DEFAULT_NAMESPACE};

use crate::UsageError;

/// Where the cluster is and how to talk to it; every client command takes these.
#[derive(Args, Debug, Clone)]
pub(crate) struct ClientOpts {
    /// Node address HOST:PORT; repeat or separate with commas to give several.
    #[arg(
        long = "server",
        value_name = "ADDR",
        env = "SHOAL_SERVERS",
        value_delimiter = ',',
        default_value = shoal_client::DEFAULT_SERVER
    )]
    pub(crate) servers: Vec<String>,
    /// CA certificate (PEM) that signed the nodes' certificates
    /// [default: .shoal/ca.pem if it exists].
    #[arg(long = "ca", value_name = "FILE", env = "SHOAL_CA")]
    pub(crate) ca: Option<PathBuf>,
    /// Machine-readable output (JSON).
    #[arg(long)]
    pub(crate) json: bool,
}

/// The CA file used when none is given: where `shoal dev` and a node started in this
/// directory put their development CA.
const DEFAULT_CA: &str = ".shoal/ca.pem";

impl ClientOpts {
    /// The SDK configuration these options describe.
    pub(crate) fn config(&self) -> anyhow::Result<ClientConfig> {
        let servers: Vec<String> = self
            .servers
            .iter()
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect();
        if servers.is_empty() {
            return Err(UsageError("no server address given (--server HOST:PORT)".into()).into());
        }
        let ca = match &self.ca {
            Some(ca) => ca.clone(),
            None if std::path::Path::new(DEFAULT_CA).exists() => PathBuf::from(DEFAULT_CA),
            None => {
                return Err(UsageError(format!(
                    "no CA file: pass --ca FILE or set SHOAL_CA (a node prints its CA path when it starts; {DEFAULT_CA} is used when it exists)"
                ))
                .into())
            }
        };
        Ok(ClientConfig::new(servers, ca)
            .with_client_name(format!("shoal-cli/{}", env!("CARGO_PKG_VERSION"))))
    }

    /// Connects a client with these options.
    pub(crate) async fn connect(&self) -> anyhow::Result<Client> {
        Ok(Client::connect(self.config()?).await?)
    }
}

/// Which service: name, namespace and group.
#[derive(Args, Debug, Clone)]
pub(crate) struct ServiceOpts {
    /// Service name.
    #[arg(value_name = "SERVICE")]
    pub(crate) service: String,
    /// Namespace of the service.
    #[arg(long, default_value = DEFAULT_NAMESPACE)]
    pub(crate) namespace: String,
    /// Group of the service.
    #[arg(long, default_value = DEFAULT_GROUP)]
    pub(crate) group: String,
}

impl ServiceOpts {
    pub(crate) fn key(&self) -> ServiceKey {
        ServiceKey::new(&self.namespace, &self.group, &self.service)
    }
}

/// Parses `IP:PORT` (`10.0.0.1:8080`, `[::1]:8080`). The port is range-checked as a
/// u16 only; the node validates the rest (port 0 gets its typed `InvalidPort`).
pub(crate) fn parse_ip_port(text: &str) -> Result<(IpAddr, u16), UsageError> {
    let bad = |why: &str| {
        UsageError(format!(
            "invalid address {text:?}: {why}; expected IP:PORT, e.g. 10.0.0.1:8080 or [::1]:8080"
        ))
    };
    let (host, port) = text.rsplit_once(':').ok_or_else(|| bad("no port"))?;
    let host = match host.strip_prefix('[') {
        Some(inner) => inner.strip_suffix(']').ok_or_else(|| bad("unclosed '['"))?,
        None if host.contains(':') => return Err(bad("an IPv6 address needs brackets")),
        None => host,
    };
    let ip: IpAddr = host
        .parse()
        .map_err(|_| bad(&format!("{host:?} is not an IPv4 or IPv6 address")))?;
    let port: u16 = port
        .parse()
        .map_err(|_| bad(&format!("port {port:?} is not a number in 0..=65535")))?;
    Ok((ip, port))
}

/// Parses `key=value` of `--meta`.
pub(crate) fn parse_meta(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("{text:?} is not KEY=VALUE")),
    }
}

/// Collects `--meta` pairs; a repeated key keeps its last value.
pub(crate) fn meta_map(pairs: &[(String, String)]) -> BTreeMap<String, String> {
    pairs.iter().cloned().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ip_port_v4_v6() {
        assert_eq!(
            parse_ip_port("10.0.0.1:8080").unwrap(),
            ("10.0.0.1".parse().unwrap(), 8080)
        );
        assert_eq!(
            parse_ip_port("[::1]:80").unwrap(),
            ("::1".parse().unwrap(), 80)
        );
        // Port 0 is the node's to refuse, with its typed code.
        assert_eq!(parse_ip_port("10.0.0.1:0").unwrap().1, 0);
    }

    #[test]
    fn ip_port_mistakes_are_explained() {
        for (text, says) in [
            ("10.0.0.1", "no port"),
            ("::1:80", "brackets"),
            ("[::1:80", "unclosed"),
            ("example.com:80", "not an IPv4 or IPv6"),
            ("10.0.0.1:65536", "not a number"),
            ("10.0.0.1:http", "not a number"),
        ] {
            let err = parse_ip_port(text).unwrap_err().to_string();
            assert!(err.contains(says), "{text}: {err}");
            assert!(err.contains("expected IP:PORT"), "{text}: {err}");
        }
    }

    #[test]
    fn meta_pairs() {
        assert_eq!(parse_meta("a=b=c").unwrap(), ("a".into(), "b=c".into()));
        assert_eq!(parse_meta("a=").unwrap(), ("a".into(), "".into()));
        assert!(parse_meta("=b").is_err());
        assert!(parse_meta("ab").is_err());
    }
}
