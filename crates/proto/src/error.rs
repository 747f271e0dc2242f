//! Typed error codes carried to the caller.

use serde::{Deserialize, Serialize};
use shoal_storage::StorageError;

/// What went wrong, as a code a program can match on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ErrorCode {
    /// A namespace, group, service or cluster name broke the naming rules.
    InvalidName,
    /// Port outside 1..=65535.
    InvalidPort,
    /// Weight not a number in 0..=10000.
    InvalidWeight,
    /// IP address that is not IPv4 or IPv6.
    InvalidIp,
    /// Metadata too large, or with an empty or overlong key or value.
    InvalidMetadata,
    /// Some other setting out of range (threshold, Ttl timings).
    InvalidSetting,
    /// The namespace does not exist.
    UnknownNamespace,
    /// The instance or service is not registered.
    NotFound,
    /// A frame longer than the node accepts; the stream is closed after this error.
    FrameTooLarge,
    /// A frame that did not decode; the stream is closed after this error.
    MalformedFrame,
    /// The first frame was not a Hello, or a Hello came twice.
    ProtocolViolation,
    /// Hello asked for a protocol version the node does not speak.
    UnsupportedVersion,
    /// The node is not ready to serve (still starting or shutting down).
    NotReady,
    /// The write could not reach the service's owner (it may have just failed);
    /// retry, possibly on another node.
    Unavailable,
    /// A request for a subscription that does not exist, or similar misuse.
    BadRequest,
    /// A failure inside the node; the request may be retried.
    Internal,
}

/// An error as it crosses the wire: a code and a one-line human reason.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// Machine-readable code.
    pub code: ErrorCode,
    /// Human-readable reason, one line.
    pub message: String,
}

impl ErrorBody {
    /// An error with this code and message.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ErrorBody {
            code,
            message: message.into(),
        }
    }
}

impl std::fmt::Display for ErrorBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}: {}", self.code, self.message)
    }
}

impl std::error::Error for ErrorBody {}

impl From<&StorageError> for ErrorCode {
    fn from(e: &StorageError) -> Self {
        match e {
            StorageError::InvalidName { .. } => ErrorCode::InvalidName,
            StorageError::InvalidPort(_) => ErrorCode::InvalidPort,
            StorageError::InvalidWeight(_) => ErrorCode::InvalidWeight,
            StorageError::InvalidIp(_) => ErrorCode::InvalidIp,
            StorageError::InvalidMetadata(_) => ErrorCode::InvalidMetadata,
            StorageError::InvalidSetting(_) => ErrorCode::InvalidSetting,
            StorageError::UnknownNamespace(_) => ErrorCode::UnknownNamespace,
            StorageError::NotFound(_) => ErrorCode::NotFound,
        }
    }
}

impl From<StorageError> for ErrorBody {
    fn from(e: StorageError) -> Self {
        ErrorBody::new(ErrorCode::from(&e), e.to_string())
    }
}
