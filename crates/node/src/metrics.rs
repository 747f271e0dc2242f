//! Prometheus metrics. Histograms have explicit buckets, so they render as
//! histograms (which aggregate across nodes), not summaries.

use std::sync::OnceLock;

use anyhow::{Context, Result};
use metrics::{Counter, Histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use shoal_replication::PeerMsg;

/// Latency buckets in seconds: 50 µs to 10 s.
const LATENCY_BUCKETS: &[f64] = &[
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0,
];

/// Batch size buckets (operations per replication batch).
const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 512.0, 1024.0];

/// Installs the process-wide recorder and returns the handle that renders it.
pub fn install() -> Result<PrometheusHandle> {
    PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
        .context("histogram buckets")?
        .set_buckets_for_metric(Matcher::Suffix("_ops".into()), BATCH_BUCKETS)
        .context("histogram buckets")?
        .install_recorder()
        .context("installing the metrics recorder")
}

/// What a client request is, as the `kind` label of `shoal_requests_total` and
/// `shoal_request_duration_seconds` names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Register,
    RegisterMany,
    Update,
    Deregister,
    Beat,
    SetServiceMeta,
    Query,
    ListServices,
    Subscribe,
    Unsubscribe,
    Members,
    Ring,
    Ping,
    Goodbye,
}

impl Kind {
    /// Every kind, in the order of their discriminants.
    const ALL: [Kind; 14] = [
        Kind::Register,
        Kind::RegisterMany,
        Kind::Update,
        Kind::Deregister,
        Kind::Beat,
        Kind::SetServiceMeta,
        Kind::Query,
        Kind::ListServices,
        Kind::Subscribe,
        Kind::Unsubscribe,
        Kind::Members,
        Kind::Ring,
        Kind::Ping,
        Kind::Goodbye,
    ];

    /// The label.
    pub fn label(self) -> &'static str {
        match self {
            Kind::Register => "register",
            Kind::RegisterMany => "register_many",
            Kind::Update => "update",
            Kind::Deregister => "deregister",
            Kind::Beat => "beat",
            Kind::SetServiceMeta => "set_service_meta",
            Kind::Query => "query",
            Kind::ListServices => "list_services",
            Kind::Subscribe => "subscribe",
            Kind::Unsubscribe => "unsubscribe",
            Kind::Members => "members",
            Kind::Ring => "ring",
            Kind::Ping => "ping",
            Kind::Goodbye => "goodbye",
        }
    }
}

/// The metrics of one kind of client request.
pub struct RequestMetrics {
    /// `shoal_requests_total{kind, outcome="ok"}`.
    pub ok: Counter,
    /// `shoal_requests_total{kind, outcome="error"}`.
    pub error: Counter,
    /// `shoal_request_duration_seconds{kind}`.
    pub duration: Histogram,
}

/// The metrics of requests of `kind`. The handles are looked up once: `counter!` with
/// labels hashes the name and labels and searches the registry on every call, which
/// was 2 % of a node's CPU under one registration per request (perf). They are made
/// on first use, which is after [`install`].
pub fn request(kind: Kind) -> &'static RequestMetrics {
    static ALL: OnceLock<Vec<RequestMetrics>> = OnceLock::new();
    let all = ALL.get_or_init(|| {
        Kind::ALL
            .iter()
            .map(|k| RequestMetrics {
                ok: metrics::counter!("shoal_requests_total", "kind" => k.label(), "outcome" => "ok"),
                error: metrics::counter!("shoal_requests_total", "kind" => k.label(), "outcome" => "error"),
                duration: metrics::histogram!("shoal_request_duration_seconds", "kind" => k.label()),
            })
            .collect()
    });
    &all[kind as usize]
}

/// The peer message kinds of `shoal_peer_messages_received_total`, in the order
/// [`peer_received`] numbers them.
const PEER_KINDS: [&str; 13] = [
    "ping",
    "ack",
    "batch",
    "forward",
    "forward_reply",
    "forward_many",
    "forward_many_reply",
    "snapshot_request",
    "snapshot_chunk",
    "digest",
    "digest_reply",
    "repair",
    "repair_request",
];

/// `shoal_peer_messages_received_total{kind}` of `msg`, looked up once (see
/// [`request`]).
pub fn peer_received(msg: &PeerMsg) -> &'static Counter {
    static ALL: OnceLock<Vec<Counter>> = OnceLock::new();
    let all = ALL.get_or_init(|| {
        PEER_KINDS
            .iter()
            .map(|k| metrics::counter!("shoal_peer_messages_received_total", "kind" => *k))
            .collect()
    });
    &all[match msg {
        PeerMsg::Ping(_) => 0,
        PeerMsg::Ack(_) => 1,
        PeerMsg::Batch(_) => 2,
        PeerMsg::Forward { .. } => 3,
        PeerMsg::ForwardReply { .. } => 4,
        PeerMsg::ForwardMany { .. } => 5,
        PeerMsg::ForwardManyReply { .. } => 6,
        PeerMsg::SnapshotRequest { .. } => 7,
        PeerMsg::SnapshotChunk(_) => 8,
        PeerMsg::Digest { .. } => 9,
        PeerMsg::DigestReply { .. } => 10,
        PeerMsg::Repair { .. } => 11,
        PeerMsg::RepairRequest { .. } => 12,
    }]
}

/// Metrics recorded on every write run or replication batch, looked up once (see
/// [`request`]).
pub struct Hot {
    /// `shoal_forwarded_writes_total`.
    pub forwarded_writes: Counter,
    /// `shoal_write_run_ops`.
    pub write_run_ops: Histogram,
    /// `shoal_replication_batch_ops`.
    pub batch_ops: Histogram,
    /// `shoal_replication_lag_seconds`.
    pub replication_lag: Histogram,
}

/// See [`Hot`].
pub fn hot() -> &'static Hot {
    static HOT: OnceLock<Hot> = OnceLock::new();
    HOT.get_or_init(|| Hot {
        forwarded_writes: metrics::counter!("shoal_forwarded_writes_total"),
        write_run_ops: metrics::histogram!("shoal_write_run_ops"),
        batch_ops: metrics::histogram!("shoal_replication_batch_ops"),
        replication_lag: metrics::histogram!("shoal_replication_lag_seconds"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_are_listed_in_the_order_of_their_discriminants() {
        for (i, k) in Kind::ALL.iter().enumerate() {
            assert_eq!(*k as usize, i, "{k:?}");
        }
        let labels: std::collections::HashSet<_> = Kind::ALL.iter().map(|k| k.label()).collect();
        assert_eq!(labels.len(), Kind::ALL.len(), "labels are distinct");
    }
}
