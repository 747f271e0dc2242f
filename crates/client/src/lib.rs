//! The Rust SDK of Shoal: connect to a cluster, register instances, find and watch the
//! instances of the services you call.
//!
//! # The model
//!
//! A [`Client`] holds one *session* with the cluster over one QUIC connection to one
//! node, its *home*. Instances registered without a Ttl are bound to the session: they
//! live as long as it does, and QUIC keep-alives are their only heartbeat. When the home
//! node fails or the network blips, the client reconnects (to the next address in
//! [`ClientConfig::servers`]), *resumes* the same session, registers its instances
//! again, repeats its deregistrations of the last 30 s and subscribes again to its
//! services; requests made meanwhile wait for the
//! new connection. [`Client::close`] ends the session cleanly (Goodbye): its instances
//! are removed at once. A client that vanishes without Goodbye has its instances removed
//! after the session grace period.
//!
//! Reads are answered from the home node's copy. A [`Subscription`] keeps the latest
//! full instance list of a service in a local cache, pushed by the home node on every
//! change; [`Client::query_cached`] and [`Client::select_one`] read that cache.
//!
//! This room talks to nodes only through the protocol of `shoal_proto`; it never links
//! server code.
//!
//! # Example
//!
//! ```no_run
//! use shoal_client::{Client, ClientConfig, InstanceSpec, ServiceKey};
//!
//! # async fn run() -> Result<(), shoal_client::ClientError> {
//! let config = ClientConfig::new(["127.0.0.1:7400", "127.0.0.1:7401"], ".shoal/ca.pem");
//! let client = Client::connect(config).await?;
//!
//! // Register this process as an instance of "orders"; it lives as long as the session.
//! let orders = ServiceKey::named("orders");
//! client.register(&orders, InstanceSpec::new("10.0.0.7", 8080)).await?;
//!
//! // Watch the instances of "payments" and pick one to call.
//! let payments = ServiceKey::named("payments");
//! let mut sub = client.subscribe(&payments).await?;
//! println!("payments has {} instances", sub.current().instances.len());
//! if let Some(target) = client.select_one(&payments).await? {
//!     println!("calling {}:{}", target.ip, target.port);
//! }
//! while let Some(view) = sub.next().await {
//!     println!("payments changed: revision {}", view.revision);
//! #   break;
//! }
//!
//! // Goodbye: the "orders" instance is removed now.
//! client.close().await?;
//! # Ok(())
//! # }
//! ```
#![deny(missing_docs)]

mod addr;
mod balance;
mod client;
mod config;
mod error;
mod held;
mod link;
mod subscription;
mod tls;

pub use balance::{choose_weighted, is_usable};
pub use client::{new_endpoint, Client, QueryOptions, ENDPOINT_RECV_BUFFER_BYTES};
pub use config::{ClientConfig, DEFAULT_SERVER};
pub use error::{ClientError, Result};
/// The QUIC endpoint type that [`Client::connect_on`] takes ([`new_endpoint`] makes one).
pub use quinn::Endpoint;
pub use subscription::Subscription;

pub use shoal_proto::{ErrorBody, ErrorCode, MemberView, RingView, Welcome};
pub use shoal_storage::{
    Instance, InstanceKey, InstanceSpec, Lease, NodeId, ServiceKey, ServiceMeta, ServiceSummary,
    ServiceView, SessionId, TtlLease, DEFAULT_CLUSTER, DEFAULT_GROUP, DEFAULT_NAMESPACE,
};
