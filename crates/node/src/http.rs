//! The HTTP side: health, readiness, Prometheus metrics and JSON reads.
//!
//! Writes go over QUIC only; HTTP is for operators, probes and dashboards.

use std::sync::Arc;

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use metrics_exporter_prometheus::PrometheusHandle;
use serde::Deserialize;
use shoal_proto::{ErrorBody, ErrorCode};
use shoal_storage::{ServiceKey, DEFAULT_GROUP, DEFAULT_NAMESPACE};

use crate::state::{read, Shared};

#[derive(Clone)]
struct AppState {
    shared: Arc<Shared>,
    metrics: Option<PrometheusHandle>,
}

/// The router of the HTTP side.
pub fn router(shared: Arc<Shared>, metrics: Option<PrometheusHandle>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_page))
        .route("/v1/node", get(node_info))
        .route("/v1/namespaces", get(namespaces))
        .route("/v1/services", get(services))
        .route("/v1/instances", get(instances))
        .route("/v1/dump", get(dump))
        .route("/v1/members", get(members))
        .route("/v1/ring", get(ring))
        .with_state(AppState { shared, metrics })
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(s): State<AppState>) -> Response {
    if s.shared.is_ready() {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n").into_response()
    }
}

async fn metrics_page(State(s): State<AppState>) -> Response {
    match &s.metrics {
        Some(h) => ([("content-type", "text/plain; version=0.0.4")], h.render()).into_response(),
        None => (StatusCode::NOT_FOUND, "metrics are not enabled\n").into_response(),
    }
}

async fn node_info(State(s): State<AppState>) -> Json<serde_json::Value> {
    let replica = read(&s.shared.replica);
    let registry = replica.registry();
    Json(serde_json::json!({
        "node_id": s.shared.node_id,
        "ready": s.shared.is_ready(),
        "addr": s.shared.my_addr(),
        "services": registry.service_count(),
        "instances": registry.instance_count(),
        "self_preservation": replica.self_preservation_active(),
        "sessions": s.shared.session_count(),
    }))
}

async fn namespaces(State(s): State<AppState>) -> Json<Vec<String>> {
    Json(read(&s.shared.replica).registry().namespaces())
}

#[derive(Deserialize)]
struct ServicesParams {
    namespace: Option<String>,
    group: Option<String>,
}

/// A node that has not loaded the registry answers no reads (it would answer with a
/// partial copy).
fn not_ready(s: &AppState) -> Option<Response> {
    (!s.shared.is_ready()).then(|| {
        error(ErrorBody::new(
            ErrorCode::NotReady,
            "node is loading the registry; ask another node",
        ))
    })
}

async fn services(State(s): State<AppState>, Query(p): Query<ServicesParams>) -> Response {
    if let Some(r) = not_ready(&s) {
        return r;
    }
    let ns = p.namespace.unwrap_or_else(|| DEFAULT_NAMESPACE.into());
    match read(&s.shared.replica)
        .registry()
        .list_services(&ns, p.group.as_deref())
    {
        Ok(list) => Json(list).into_response(),
        Err(e) => error(e.into()),
    }
}

#[derive(Deserialize)]
struct InstancesParams {
    namespace: Option<String>,
    group: Option<String>,
    service: String,
    /// Comma-separated cluster names.
    clusters: Option<String>,
    #[serde(default)]
    healthy_only: bool,
}

async fn instances(State(s): State<AppState>, Query(p): Query<InstancesParams>) -> Response {
    if let Some(r) = not_ready(&s) {
        return r;
    }
    let key = ServiceKey::new(
        p.namespace.unwrap_or_else(|| DEFAULT_NAMESPACE.into()),
        p.group.unwrap_or_else(|| DEFAULT_GROUP.into()),
        p.service,
    );
    let clusters: Vec<String> = p
        .clusters
        .map(|c| {
            c.split(',')
                .filter(|s| !s.is_empty())
                .map(String::from)
                .collect()
        })
        .unwrap_or_default();
    match read(&s.shared.replica)
        .registry()
        .query(&key, &clusters, p.healthy_only)
    {
        Ok(view) => Json(view).into_response(),
        Err(e) => error(e.into()),
    }
}

/// The replicated content, comparable across nodes: node-local fields (the local
/// change counter, the last beat time) are left out. A debugging view: it answers even
/// while the node is loading (so a test can watch the load).
async fn dump(State(s): State<AppState>) -> Response {
    let dump = read(&s.shared.replica).registry().dump_replicated();
    let services: Vec<serde_json::Value> = dump
        .into_iter()
        .map(|svc| {
            let instances: Vec<serde_json::Value> = svc
                .instances
                .iter()
                .map(|(stamp, i)| {
                    serde_json::json!({
                        "cluster": i.cluster, "ip": i.ip, "port": i.port,
                        "weight": i.weight, "healthy": i.healthy, "enabled": i.enabled,
                        "metadata": i.metadata, "lease": i.lease,
                        "version": [stamp.time, stamp.origin],
                    })
                })
                .collect();
            serde_json::json!({"key": svc.key, "meta": svc.meta, "instances": instances})
        })
        .collect();
    Json(services).into_response()
}

async fn members(State(s): State<AppState>) -> Response {
    Json(crate::cluster::members(&s.shared)).into_response()
}

#[derive(Deserialize)]
struct RingParams {
    namespace: Option<String>,
    group: Option<String>,
    service: Option<String>,
}

async fn ring(State(s): State<AppState>, Query(p): Query<RingParams>) -> Response {
    let key = p.service.map(|svc| {
        ServiceKey::new(
            p.namespace.unwrap_or_else(|| DEFAULT_NAMESPACE.into()),
            p.group.unwrap_or_else(|| DEFAULT_GROUP.into()),
            svc,
        )
    });
    match crate::cluster::ring(&s.shared, key.as_ref()) {
        Ok(view) => Json(view).into_response(),
        Err(e) => error(e),
    }
}

fn error(e: ErrorBody) -> Response {
    let status = match e.code {
        ErrorCode::NotFound | ErrorCode::UnknownNamespace => StatusCode::NOT_FOUND,
        ErrorCode::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        ErrorCode::NotReady => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::BAD_REQUEST,
    };
    (status, Json(e)).into_response()
}
