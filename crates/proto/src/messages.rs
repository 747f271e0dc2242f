//! The messages of the client protocol.

use serde::{Deserialize, Serialize};
use shoal_storage::{
    InstanceKey, InstanceSpec, NodeId, ServiceKey, ServiceMeta, ServiceSummary, ServiceView,
    SessionId,
};

use crate::error::ErrorBody;

/// A request id, chosen by the client; the response carries it back.
pub type RequestId = u64;

/// Most items in one [`Request::RegisterMany`].
pub const MAX_BATCH_ITEMS: usize = 1_024;

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

/// A [`ClientFrame`] by reference, for encoding only: the same bytes as the owned
/// frame, for a client that keeps its request (to send it again after a reconnect)
/// and need not copy it to send it.
#[derive(Debug, Serialize)]
#[serde(rename = "ClientFrame")]
pub enum ClientFrameRef<'a> {
    /// [`ClientFrame::Hello`].
    Hello(&'a Hello),
    /// [`ClientFrame::Request`].
    Request {
        /// Chosen by the client, echoed in the response.
        id: RequestId,
        /// What to do.
        body: &'a Request,
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
    /// Register (or replace) several instances, each as [`Request::Register`], in one
    /// request: at most [`MAX_BATCH_ITEMS`]. Answered [`Response::AppliedMany`] with
    /// one outcome per item, in order; a bad item is refused alone.
    RegisterMany {
        /// `(service, instance)` pairs, in the order they are applied.
        items: Vec<(ServiceKey, InstanceSpec)>,
    },
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
    /// The cluster's members as the asked node sees them.
    Members,
    /// The ring: each member's ownership share and, if a service is given, its owner.
    Ring {
        /// The service whose owner to name.
        #[serde(default)]
        service: Option<ServiceKey>,
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
    Push(#[serde(with = "crate::compact")] ServiceView),
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
    /// The [`crate::REQUEST_SHAPE`] of the node: a client of the same shape may send
    /// requests with structs as arrays. 0 (a node that does not say) means maps only.
    #[serde(default)]
    pub request_shape: u32,
}

/// A successful answer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Response {
    /// The write was applied; the service is now at this revision.
    Applied {
        /// The service's revision after the write.
        revision: u64,
    },
    /// The outcomes of a [`Request::RegisterMany`], one per item in its order: the
    /// service's revision after that item, or why it was refused.
    AppliedMany(Vec<Result<u64, ErrorBody>>),
    /// The instances of a service (Query and Subscribe).
    View(#[serde(with = "crate::compact")] ServiceView),
    /// The services of a namespace.
    Services(Vec<ServiceSummary>),
    /// The members, as the asked node sees them.
    Members(Vec<MemberView>),
    /// The ring.
    Ring(RingView),
    /// Answer to Unsubscribe, Ping and Goodbye.
    Done,
}

/// A member of the cluster as one node sees it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MemberView {
    /// Its node id.
    pub id: NodeId,
    /// The address it is reached at.
    pub addr: String,
    /// `up`, `suspect` or `down`.
    pub state: String,
    /// Whether it has loaded the registry and owns services.
    pub ready: bool,
    /// Whether it is the node that answered.
    pub is_self: bool,
    /// Milliseconds since it was last heard from (`None` for the answering node or a
    /// member known only from gossip).
    #[serde(default)]
    pub last_heard_ago_ms: Option<u64>,
}

/// The ring as one node sees it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RingView {
    /// Virtual nodes per member.
    pub vnodes: u32,
    /// Each member in the ring with its share of the hash space (0..=1).
    pub shares: Vec<(NodeId, f64)>,
    /// The owner of the asked service, when one was asked and the ring is not empty.
    #[serde(default)]
    pub owner: Option<NodeId>,
    /// The asked service's position on the ring.
    #[serde(default)]
    pub position: Option<u64>,
}
