//! The messages of the client protocol.

use serde::{Deserialize, Serialize};
use shoal_storage::{
    InstanceKey, InstanceSpec, NodeId, ServiceKey, ServiceMeta, ServiceSummary, ServiceView,
    SessionId,
};

use crate::error::ErrorBody;

/// A request id, chosen by the client; the response carries it back.
pub type RequestId = u64;

/// Frames a client sends on its session stream.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum ClientFrame {
    /// First frame of a session stream: open a new session or resume one.
    Hello(Hello),
    /// A request; answered by a [`ServerFrame::Response`] with the same id.
    Request {
        /// Chosen by the client, echoed in the response.
        id: RequestId,
        /// What to do.
        body: Request,
    },
}

/// Opens or resumes a session.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Hello {
    /// The client's protocol version; see [`crate::PROTOCOL_VERSION`].
    pub version: u32,
    /// A free-form name of the client (program and version), for logs and metrics.
    #[serde(default)]
    pub client_name: String,
    /// `Some`: resume this session (its instances are kept if it is still known or
    /// within its grace period). `None`: open a new session.
    #[serde(default)]
    pub resume: Option<SessionId>,
}

/// What a client asks of its home node.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Request {
    /// Register (or replace) an instance. Without a Ttl in the spec the instance is
    /// bound to this session.
    Register {
        /// The service.
        service: ServiceKey,
        /// The instance.
        instance: InstanceSpec,
    },
    /// Change an existing instance (weight, health, enabled, metadata); keeps its lease.
    Update {
        /// The service.
        service: ServiceKey,
        /// The instance's new settings; `(cluster, ip, port)` names which instance.
        instance: InstanceSpec,
    },
    /// Remove an instance.
    Deregister {
        /// The service.
        service: ServiceKey,
        /// Which instance.
        instance: InstanceKey,
    },
    /// Keep a Ttl instance alive.
    Beat {
        /// The service.
        service: ServiceKey,
        /// Which instance.
        instance: InstanceKey,
    },
    /// Set a service's protection threshold and metadata.
    SetServiceMeta {
        /// The service.
        service: ServiceKey,
        /// Its new settings.
        meta: ServiceMeta,
    },
    /// Read the instances of a service from the home node's copy.
    Query {
        /// The service.
        service: ServiceKey,
        /// Only these clusters; all when empty.
        #[serde(default)]
        clusters: Vec<String>,
        /// Only healthy, enabled instances (subject to the protection threshold).
        #[serde(default)]
        healthy_only: bool,
    },
    /// List the services of a namespace, optionally of one group.
    ListServices {
        /// The namespace.
        namespace: String,
        /// Only this group, when given.
        #[serde(default)]
        group: Option<String>,
    },
    /// Subscribe to a service: the response carries the current view, and each later
    /// change arrives as a [`ServerFrame::Push`] with the full instance list.
    Subscribe {
        /// The service.
        service: ServiceKey,
    },
    /// Stop the pushes of a service.
    Unsubscribe {
        /// The service.
        service: ServiceKey,
    },
    /// Round trip, for liveness checks and latency measurement.
    Ping,
    /// End the session cleanly: its instances are removed now, without a grace period.
    Goodbye,
}

/// Frames a node sends on a session stream.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum ServerFrame {
    /// Answer to [`Hello`].
    Welcome(Welcome),
    /// Answer to a request.
    Response {
        /// The request's id.
        id: RequestId,
        /// The outcome.
        result: Result<Response, ErrorBody>,
    },
    /// A subscribed service changed: its whole current instance list.
    Push(ServiceView),
    /// An error not tied to a request (a malformed or oversized frame, a missing
    /// Hello). The node closes the stream after sending it.
    Error(ErrorBody),
}

/// The node's answer to [`Hello`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Welcome {
    /// The session this stream now carries.
    pub session_id: SessionId,
    /// True if an existing session was resumed (its instances were kept).
    pub resumed: bool,
    /// The node that answered.
    pub node_id: NodeId,
    /// How long the node keeps a session's instances after an unclean disconnect.
    pub session_grace_ms: u64,
    /// The largest frame the node accepts.
    pub max_frame_bytes: u32,
}

/// A successful answer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Response {
    /// The write was applied; the service is now at this revision.
    Applied {
        /// The service's revision after the write.
        revision: u64,
    },
    /// The instances of a service (Query and Subscribe).
    View(ServiceView),
    /// The services of a namespace.
    Services(Vec<ServiceSummary>),
    /// Answer to Unsubscribe, Ping and Goodbye.
    Done,
}
