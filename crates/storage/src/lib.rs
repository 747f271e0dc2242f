//! The registry state of Shoal: the data model, validation, merge rules and change
//! events.
//!
//! This room is pure. It never spawns a task, opens a socket or reads a clock: every
//! operation that depends on time takes `now_ms` from its caller, so the rules here are
//! tested with plain unit tests and a clock the test sets.
//!
//! The [`Registry`] holds every service of every namespace. Each write returns the
//! [`Change`] it made, so the caller (the node) knows which subscribers to notify.
#![deny(missing_docs)]

mod error;
mod model;
mod registry;
mod validate;

pub use error::StorageError;
pub use model::*;
pub use registry::{Change, Limits, Registry};
pub use validate::{
    validate_instance, validate_instance_key, validate_name, validate_service_key,
    validate_service_meta, NameKind,
};
