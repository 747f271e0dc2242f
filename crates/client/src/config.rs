//! Settings of a [`Client`](crate::Client): where the nodes are, whom to trust, and every
//! timing the SDK uses.

use std::path::PathBuf;
use std::time::Duration;

use shoal_proto::DEFAULT_MAX_FRAME_BYTES;

/// The address a client uses when it is given none: a node on this machine.
pub const DEFAULT_SERVER: &str = "127.0.0.1:7400";

/// How a [`Client`](crate::Client) connects and how long it waits.
///
/// Build one with [`ClientConfig::new`] and the `with_*` methods, or start from
/// [`ClientConfig::default`] and set the fields.
#[derive(Clone, Debug, PartialEq)]
pub struct ClientConfig {
    /// Node addresses as `host:port` (`10.0.0.1:7400`, `[::1]:7400`, `node-0.shoal:7400`).
    /// The client starts at a random one and moves to the next on failure.
    pub servers: Vec<String>,
    /// PEM file of the certificate authority that signed the nodes' certificates.
    /// Required: Shoal nodes do not use public certificates.
    pub ca_file: Option<PathBuf>,
    /// A free-form name of this client (program and version) for the nodes' logs.
    pub client_name: String,
    /// How long a request may take, including waiting for a reconnection.
    pub request_timeout: Duration,
    /// How long one connection attempt (QUIC and TLS handshake, Hello) may take.
    pub connect_timeout: Duration,
    /// QUIC keep-alive interval. Every packet received restarts it, so against
    /// nodes that send heartbeats (every 5 s by default, `heartbeat_interval_ms`)
    /// the client never sends one: it is the fallback for nodes that do not.
    pub keep_alive_interval: Duration,
    /// QUIC idle timeout: a connection silent for this long is considered lost.
    /// Default 12 s: two of the nodes' heartbeats fit in it, so one lost datagram
    /// does not end a session, and it is well inside the nodes' `down_after_ms`
    /// (2.5 s) plus `session_grace_ms` (15 s), so a client whose home node dies
    /// resumes on another node before the owners delete its instances.
    pub idle_timeout: Duration,
    /// Pause after every server failed once during a reconnect; doubles after each
    /// full round up to [`ClientConfig::reconnect_backoff_max`], with random jitter.
    pub reconnect_backoff: Duration,
    /// Longest pause between reconnect rounds.
    pub reconnect_backoff_max: Duration,
    /// Largest frame the client sends or accepts, in bytes. The client also respects
    /// the smaller limit a node announces in its Welcome.
    pub max_frame_bytes: usize,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            servers: vec![DEFAULT_SERVER.to_string()],
            ca_file: None,
            client_name: format!("shoal-client/{}", env!("CARGO_PKG_VERSION")),
            request_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(5),
            keep_alive_interval: Duration::from_secs(6),
            idle_timeout: Duration::from_secs(12),
            reconnect_backoff: Duration::from_millis(200),
            reconnect_backoff_max: Duration::from_secs(5),
            max_frame_bytes: DEFAULT_MAX_FRAME_BYTES,
        }
    }
}

impl ClientConfig {
    /// Defaults, with these servers and this CA file.
    pub fn new<S: Into<String>>(
        servers: impl IntoIterator<Item = S>,
        ca_file: impl Into<PathBuf>,
    ) -> Self {
        ClientConfig {
            servers: servers.into_iter().map(Into::into).collect(),
            ca_file: Some(ca_file.into()),
            ..ClientConfig::default()
        }
    }

    /// Sets the client name shown in the nodes' logs.
    pub fn with_client_name(mut self, name: impl Into<String>) -> Self {
        self.client_name = name.into();
        self
    }

    /// Sets [`ClientConfig::request_timeout`].
    pub fn with_request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// Sets [`ClientConfig::connect_timeout`].
    pub fn with_connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Sets the QUIC keep-alive interval and idle timeout.
    pub fn with_liveness(mut self, keep_alive_interval: Duration, idle_timeout: Duration) -> Self {
        self.keep_alive_interval = keep_alive_interval;
        self.idle_timeout = idle_timeout;
        self
    }

    /// Sets the first and the longest pause between reconnect rounds.
    pub fn with_reconnect_backoff(mut self, first: Duration, max: Duration) -> Self {
        self.reconnect_backoff = first;
        self.reconnect_backoff_max = max;
        self
    }

    /// Sets [`ClientConfig::max_frame_bytes`].
    pub fn with_max_frame_bytes(mut self, bytes: usize) -> Self {
        self.max_frame_bytes = bytes;
        self
    }

    /// Checks the settings that cannot work, before any connection is tried.
    pub(crate) fn check(&self) -> Result<(), crate::ClientError> {
        use crate::ClientError::Config;
        if self.servers.is_empty() {
            return Err(Config("no server address given".into()));
        }
        for s in &self.servers {
            crate::addr::split_host_port(s)?;
        }
        if self.ca_file.is_none() {
            return Err(Config(
                "no CA file given: Shoal nodes are trusted through the CA that signed their certificates".into(),
            ));
        }
        if self.keep_alive_interval.is_zero() || self.idle_timeout <= self.keep_alive_interval {
            return Err(Config(format!(
                "keep-alive interval ({:?}) must be non-zero and shorter than the idle timeout ({:?})",
                self.keep_alive_interval, self.idle_timeout
            )));
        }
        if self.request_timeout.is_zero() || self.connect_timeout.is_zero() {
            return Err(Config("timeouts must be non-zero".into()));
        }
        if self.max_frame_bytes < 1024 || self.max_frame_bytes > u32::MAX as usize {
            return Err(Config(format!(
                "max_frame_bytes {} must be in 1024..=4294967295",
                self.max_frame_bytes
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_the_documented_ones() {
        let c = ClientConfig::default();
        assert_eq!(c.servers, vec!["127.0.0.1:7400".to_string()]);
        assert_eq!(c.request_timeout, Duration::from_secs(10));
        assert_eq!(c.keep_alive_interval, Duration::from_secs(6));
        assert_eq!(c.idle_timeout, Duration::from_secs(12));
    }

    #[test]
    fn check_refuses_what_cannot_work() {
        assert!(ClientConfig::default().check().is_err(), "no CA file");
        let ok = ClientConfig::new(["127.0.0.1:7400", "[::1]:7400"], "ca.pem");
        assert!(ok.check().is_ok());
        let mut bad = ok.clone();
        bad.servers.clear();
        assert!(bad.check().is_err());
        let bad = ok
            .clone()
            .with_liveness(Duration::from_secs(5), Duration::from_secs(5));
        assert!(bad.check().is_err());
        let mut bad = ok.clone();
        bad.servers = vec!["no-port".into()];
        assert!(bad.check().is_err());
    }
}
