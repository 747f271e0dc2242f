//! Errors of the registry. Every variant means that nothing changed.

use thiserror::Error;

/// Why the registry refused an operation. In every case the registry is unchanged.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum StorageError {
    /// A namespace, group, service, cluster or metadata name broke the naming rules.
    #[error("invalid {what}: {reason}")]
    InvalidName {
        /// Which name: "namespace", "group", "service", "cluster".
        what: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// The port was 0.
    #[error("invalid port {0}: must be 1..=65535")]
    InvalidPort(u32),
    /// The weight was not a finite number in 0..=10000.
    #[error("invalid weight {0}: must be a number in 0..=10000")]
    InvalidWeight(String),
    /// The IP address did not parse as IPv4 or IPv6.
    #[error("invalid ip {0:?}: must be an IPv4 or IPv6 address")]
    InvalidIp(String),
    /// Metadata had too many entries, or a key or value too long, or an empty key.
    #[error("invalid metadata: {0}")]
    InvalidMetadata(String),
    /// A protection threshold outside 0.0..=1.0, or a Ttl lease with bad timings.
    #[error("invalid setting: {0}")]
    InvalidSetting(String),
    /// The namespace does not exist on this registry.
    #[error("unknown namespace {0:?}")]
    UnknownNamespace(String),
    /// The instance (or service) to update, deregister or beat is not registered.
    #[error("not found: {0}")]
    NotFound(String),
}

impl StorageError {
    /// A stable short name of the variant, for the wire and for metrics labels:
    /// `invalid_name`, `invalid_port`, `invalid_weight`, `invalid_ip`,
    /// `invalid_metadata`, `invalid_setting`, `unknown_namespace`, `not_found`.
    pub fn code(&self) -> &'static str {
        match self {
            StorageError::InvalidName { .. } => "invalid_name",
            StorageError::InvalidPort(_) => "invalid_port",
            StorageError::InvalidWeight(_) => "invalid_weight",
            StorageError::InvalidIp(_) => "invalid_ip",
            StorageError::InvalidMetadata(_) => "invalid_metadata",
            StorageError::InvalidSetting(_) => "invalid_setting",
            StorageError::UnknownNamespace(_) => "unknown_namespace",
            StorageError::NotFound(_) => "not_found",
        }
    }
}
