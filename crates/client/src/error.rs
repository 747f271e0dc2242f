//! The errors of the SDK.

use std::time::Duration;

use shoal_proto::{ErrorBody, ErrorCode, FrameError};
use thiserror::Error;

/// Why a client operation failed.
///
/// Only [`ClientError::Server`] says for certain that the node refused the request (and
/// changed nothing). After [`ClientError::Timeout`] or [`ClientError::Disconnected`] a
/// write may or may not have been applied; writes are idempotent, so retrying is safe.
#[derive(Debug, Error)]
pub enum ClientError {
    /// The node refused the request; the code says why. Nothing changed.
    #[error("{0}")]
    Server(ErrorBody),
    /// No answer within the request timeout (which includes waiting for a reconnection).
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// The connection was lost while the request was in flight and could not be retried.
    #[error("connection to the node lost")]
    Disconnected,
    /// The client was closed; it makes no more requests.
    #[error("client is closed")]
    Closed,
    /// No node could be reached; one reason per address tried.
    #[error("cannot connect to any node: {0}")]
    Connect(String),
    /// The CA file or the TLS setup is unusable.
    #[error("tls: {0}")]
    Tls(String),
    /// A setting in [`ClientConfig`](crate::ClientConfig) cannot work.
    #[error("config: {0}")]
    Config(String),
    /// A request was larger than the node accepts, or a frame could not be encoded.
    #[error("{0}")]
    Frame(#[from] FrameError),
    /// Reading a file (the CA) or opening a socket failed.
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    /// The node answered something this client did not expect (a version mismatch or a
    /// bug).
    #[error("protocol: {0}")]
    Protocol(String),
}

impl ClientError {
    /// The node's error code, when the node refused the request.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Server(body) => Some(body.code),
            _ => None,
        }
    }

    /// True when retrying the same request later may succeed: the connection, not the
    /// request, was the problem (or the node was not ready, or could not reach the
    /// service's owner).
    pub fn is_transient(&self) -> bool {
        match self {
            ClientError::Timeout(_) | ClientError::Disconnected | ClientError::Connect(_) => true,
            ClientError::Server(body) => matches!(
                body.code,
                ErrorCode::NotReady | ErrorCode::Unavailable | ErrorCode::Internal
            ),
            _ => false,
        }
    }
}

impl From<ErrorBody> for ClientError {
    fn from(body: ErrorBody) -> Self {
        ClientError::Server(body)
    }
}

/// The result of a client operation.
pub type Result<T, E = ClientError> = std::result::Result<T, E>;
