//! The registry: every service of every namespace, and the index of sessions.

use crate::error::StorageError;
use crate::model::*;

/// Bounds that validation enforces. Defaults are documented in docs/configuration.md.
#[derive(Clone, Debug, PartialEq)]
pub struct Limits {
    /// Longest namespace, group, service or cluster name, in bytes.
    pub max_name_len: usize,
    /// Most metadata entries on one instance or service.
    pub max_metadata_entries: usize,
    /// Longest metadata key, in bytes.
    pub max_metadata_key_len: usize,
    /// Longest metadata value, in bytes.
    pub max_metadata_value_len: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_name_len: 128,
            max_metadata_entries: 64,
            max_metadata_key_len: 128,
            max_metadata_value_len: 1024,
        }
    }
}

/// A service changed: its key and its new revision.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Change {
    /// The service that changed.
    pub key: ServiceKey,
    /// Its revision after the change.
    pub revision: u64,
}

/// The registry state. See the crate docs.
#[derive(Debug)]
pub struct Registry {
    _todo: (),
}

impl Registry {
    /// An empty registry whose only namespace is [`DEFAULT_NAMESPACE`].
    pub fn new(limits: Limits) -> Self {
        todo!()
    }

    /// The limits this registry validates against.
    pub fn limits(&self) -> &Limits {
        todo!()
    }

    /// Adds a namespace (validated as a name). Returns false if it already existed.
    pub fn add_namespace(&mut self, namespace: &str) -> Result<bool, StorageError> {
        todo!()
    }

    /// The namespaces, sorted.
    pub fn namespaces(&self) -> Vec<String> {
        todo!()
    }

    /// Registers or replaces the instance `spec.key()` of `service`. Without a Ttl in
    /// the spec, the instance's lease is `Session(session)`; with one, `Ttl` and its
    /// last beat is `now_ms`. Creates the service if it does not exist.
    /// Validates everything first; on error nothing changes.
    pub fn register(
        &mut self,
        service: &ServiceKey,
        spec: InstanceSpec,
        session: SessionId,
        now_ms: u64,
    ) -> Result<Change, StorageError> {
        todo!()
    }

    /// Changes weight, healthy, enabled and metadata of an existing instance; keeps
    /// its lease. `NotFound` if it is not registered.
    pub fn update(
        &mut self,
        service: &ServiceKey,
        spec: InstanceSpec,
        now_ms: u64,
    ) -> Result<Change, StorageError> {
        todo!()
    }

    /// Removes an instance. `NotFound` if it is not registered.
    pub fn deregister(
        &mut self,
        service: &ServiceKey,
        instance: &InstanceKey,
    ) -> Result<Change, StorageError> {
        todo!()
    }

    /// A beat for a Ttl instance: refreshes its last beat, and makes it healthy again
    /// if expiry had marked it unhealthy (then returns the change). `NotFound` if it is
    /// not registered; a beat for a session instance is accepted and changes nothing.
    pub fn beat(
        &mut self,
        service: &ServiceKey,
        instance: &InstanceKey,
        now_ms: u64,
    ) -> Result<Option<Change>, StorageError> {
        todo!()
    }

    /// Sets a service's protection threshold and metadata, creating the service if
    /// needed.
    pub fn set_service_meta(
        &mut self,
        service: &ServiceKey,
        meta: ServiceMeta,
    ) -> Result<Change, StorageError> {
        todo!()
    }

    /// Removes every instance bound to `session`; one change per service touched.
    pub fn remove_session(&mut self, session: SessionId) -> Vec<Change> {
        todo!()
    }

    /// How many instances are bound to `session`.
    pub fn session_instance_count(&self, session: SessionId) -> usize {
        todo!()
    }

    /// Ttl expiry at `now_ms`: instances without a beat for `unhealthy_after_ms` become
    /// unhealthy; without one for `remove_after_ms` are removed. One change per
    /// service touched.
    pub fn expire(&mut self, now_ms: u64) -> Vec<Change> {
        todo!()
    }

    /// The instances of a service. `clusters` empty means all clusters.
    /// `healthy_only` returns healthy, enabled instances, unless the healthy share is
    /// at or below the service's protection threshold (when that is above 0): then all
    /// enabled instances, with `protected` set. An unknown service gives an empty
    /// view at revision 0; an unknown namespace is an error.
    pub fn query(
        &self,
        service: &ServiceKey,
        clusters: &[String],
        healthy_only: bool,
    ) -> Result<ServiceView, StorageError> {
        todo!()
    }

    /// The services of a namespace (optionally one group), sorted by key.
    pub fn list_services(
        &self,
        namespace: &str,
        group: Option<&str>,
    ) -> Result<Vec<ServiceSummary>, StorageError> {
        todo!()
    }

    /// A service's settings, if the service exists.
    pub fn service_meta(&self, service: &ServiceKey) -> Option<&ServiceMeta> {
        todo!()
    }

    /// Number of services.
    pub fn service_count(&self) -> usize {
        todo!()
    }

    /// Number of instances, over all services.
    pub fn instance_count(&self) -> usize {
        todo!()
    }

    /// Every service with its settings and instances, sorted by key and instance key:
    /// two registries with the same content give equal dumps.
    pub fn dump(&self) -> Vec<(ServiceKey, ServiceMeta, Vec<Instance>)> {
        todo!()
    }
}
