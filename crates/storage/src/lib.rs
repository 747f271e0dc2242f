//! The registry state of Shoal: the data model, validation, merge rules and change
//! events.
//!
//! This room is pure. It never spawns a task, opens a socket or reads a clock: every
//! operation that depends on time takes `now_ms` from its caller, so the rules here are
//! tested with plain unit tests and a clock the test sets.
//!
//! The [`Registry`] holds every service of every namespace. Each write returns the
//! [`Change`] it made, so the caller (the node) knows which subscribers to notify.
//!
//! For replication (see [`Stamp`] and the `replica` module docs), every record also
//! carries a version stamp, deletions leave tombstones, and remote operations merge
//! last-writer-wins with [`Registry::apply_remote`]. Local writes record the operations
//! to send to peers ([`Registry::take_ops`]) once [`Registry::set_replication`] turns
//! recording on. Digests per service and per ring arc let anti-entropy find what
//! differs without shipping the data.
#![deny(missing_docs)]

mod compact;
mod error;
mod model;
mod registry;
mod replica;
mod validate;

/// A value never handed out before in this process: registries stamp their state
/// with one when it changes, so that a caller can tell whether anything changed since
/// it last looked, even across registries.
pub(crate) fn next_generation() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

pub use error::StorageError;
pub use model::*;
pub use registry::{Change, Limits, Registry};
pub use replica::{
    in_arc, origin_of, stable_hash, InstanceOp, MetaOp, Op, ReplicatedService, ReplicationSettings,
    ServiceRecord, Stamp,
};
pub use validate::{
    validate_instance, validate_instance_key, validate_name, validate_service_key,
    validate_service_meta, NameKind,
};
