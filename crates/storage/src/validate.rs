//! Validation of names, addresses, weights and metadata.

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

/// Checks a name: non-empty, at most `limits.max_name_len` bytes, and only the
/// characters documented in docs/protocol.md.
pub fn validate_name(kind: NameKind, name: &str, limits: &Limits) -> Result<(), StorageError> {
    todo!()
}

/// Checks the three parts of a service key.
pub fn validate_service_key(key: &ServiceKey, limits: &Limits) -> Result<(), StorageError> {
    todo!()
}

/// Checks an instance spec: cluster name, ip, port, weight, metadata, Ttl timings.
pub fn validate_instance(spec: &InstanceSpec, limits: &Limits) -> Result<(), StorageError> {
    todo!()
}
