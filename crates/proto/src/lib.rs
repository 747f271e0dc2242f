//! The wire protocol of Shoal, shared by nodes, the SDK and tools.
//!
//! A client holds one QUIC connection (ALPN [`ALPN`]) to its home node and opens one
//! bidirectional stream on it, the *session stream*. Both directions carry frames: a
//! 4-byte big-endian length, then that many bytes of MessagePack. Structs are encoded
//! as maps (field names on the wire), so a node and a client of different versions
//! ignore the fields they do not know.
//!
//! The client sends [`ClientFrame::Hello`] first (open or resume a session), then
//! [`ClientFrame::Request`]s, each with an id of its choosing. The node answers
//! [`ServerFrame::Welcome`], then one [`ServerFrame::Response`] per request (same id,
//! in any order) and [`ServerFrame::Push`] for subscriptions.
//!
//! This room does no I/O of its own: with the `tokio` feature it reads and writes
//! frames over any `AsyncRead`/`AsyncWrite` its caller hands it.
#![deny(missing_docs)]

mod compact;
mod error;
mod fast;
mod frame;
mod messages;
pub mod mpack;

pub use error::{ErrorBody, ErrorCode};
pub use fast::{
    append_applied_answer, decode_client_frame, decode_server_frame, encode_request_compact,
    encode_write_compact, WriteRef,
};
pub use frame::{
    append_frame, append_frame_compact, append_frame_with, append_response_frame, decode,
    decode_len, encode_frame, encode_frame_compact, encode_result, FrameError,
    DEFAULT_MAX_FRAME_BYTES, LEN_PREFIX_BYTES,
};
#[cfg(feature = "tokio")]
pub use frame::{read_frame, write_frame, FrameReader};
pub use messages::*;

/// ALPN of the client protocol, version 1. A node refuses other ALPNs.
pub const ALPN: &[u8] = b"shoal/1";

/// ALPN of the peer protocol between nodes, version 1. Requires a client
/// certificate from the cluster CA.
pub const PEER_ALPN: &[u8] = b"shoal-peer/1";

/// Version of the client protocol carried in [`Hello`].
pub const PROTOCOL_VERSION: u32 = 1;

/// The shape of this version's requests: the fields of [`Request`] and of every type it
/// carries, in their order. A node states it in [`Welcome::request_shape`]; a client
/// whose own shape is the same may send its requests with structs as arrays
/// ([`encode_frame_compact`]: no field names, so smaller and cheaper to decode). Bump it
/// whenever a field is added to, removed from or moved in any of those types; a client
/// and a node of different shapes then keep to maps, which both read. The node's
/// hand-written decoder of writes ([`decode_client_frame`]) reads this shape, and the
/// SDK's hand-written encoder of writes ([`encode_request_compact`]) writes it: change
/// them with it (their tests compare them with serde).
pub const REQUEST_SHAPE: u32 = 1;
