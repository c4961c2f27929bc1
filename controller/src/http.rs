//! The controller's HTTP listener: health for probes, and the status API that standalone
//! mode offers in place of `kubectl get`.
//!
//! - `GET /healthz`: the process is alive.
//! - `GET /readyz`: the store is open and the manifests were read (standalone), or this
//!   replica leads or stands by (Kubernetes mode; `role` says which). Not ready (503) while
//!   the store refuses writes, with the reason (`"store: no space left on device"`): no
//!   share can be acknowledged then, and the store reopens itself once it can write again.
//! - `GET /metrics`: Prometheus text format (see `metrics`).
//! - `GET /loglevel`, `PUT /loglevel` (body: a `RUST_LOG` filter, from loopback only): the
//!   log filter, changeable while running.
//! - `GET /api/v1/status`: the whole fleet (MicroMiners, devices, totals, manifest errors).
//! - `GET /api/v1/microminers`: MicroMiner resources with their status, as Kubernetes
//!   would return them.
//! - `GET /api/v1/edgedevices`: devices.
//! - `GET /api/v1/assignments`: live leases (device, header, nonce range, progress, expiry).

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use axum::Json;
use axum::extract::{ConnectInfo, State};
use axum::http::StatusCode;
use axum::http::header::CONTENT_TYPE;
use axum::response::IntoResponse;
use axum::routing::get;
use serde_json::json;
use tokio::net::TcpListener;

use crate::fleet::Fleet;
use micromine_fleet::status::ManifestStatus;
use micromine_resources::microminer::API_VERSION;
use micromine_store::store::{Store, StoreHealth};

/// What the handlers read.
#[derive(Clone)]
pub struct HttpState {
    /// The fleet.
    pub fleet: Arc<Fleet>,
    /// Manifest problems.
    pub manifests: Arc<Mutex<ManifestStatus>>,
    /// Set once start-up finished.
    pub ready: Arc<AtomicBool>,
    /// `standalone`, or `leader` in Kubernetes mode (a standby serves only
    /// [`standby_router`]).
    pub role: &'static str,
    /// What `/metrics` exposes.
    pub metrics: Option<Arc<crate::metrics::Metrics>>,
    /// The store, whose health `/readyz` reports.
    pub store: Store,
}

/// The router, separate from serving so tests can drive it directly.
pub fn router(state: HttpState) -> axum::Router {
    axum::Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/loglevel", get(log_level).put(set_log_level))
        .route("/api/v1/status", get(status))
        .route("/api/v1/microminers", get(microminers))
        .route("/api/v1/edgedevices", get(edgedevices))
        .route("/api/v1/assignments", get(assignments))
        .with_state(state)
}

/// What a standby replica serves: alive and ready to take over, saying so. Readiness
/// is not leadership (a rollout must not wait for a standby to lead); the gRPC Service
/// reaches the leader through the EndpointSlice the leader publishes.
pub fn standby_router() -> axum::Router {
    axum::Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get(|| async { Json(json!({"ready": true, "role": "standby"})) }),
        )
        .route(
            "/metrics",
            get(|| async { ([(CONTENT_TYPE, PROMETHEUS_TEXT)], STANDING_BY) }),
        )
}

/// Serves until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    state: HttpState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(
        listener,
        router(state).into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(shutdown)
    .await
}

async fn log_level() -> impl IntoResponse {
    match crate::logging::filter() {
        Some(filter) => (StatusCode::OK, format!("{filter}\n")),
        None => (StatusCode::NOT_FOUND, "logging is not set up\n".to_string()),
    }
}

/// Changing what is logged is for someone on the controller's own machine (or pod, via
/// `kubectl port-forward`): from anywhere else it could flood the logs.
async fn set_log_level(
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    body: String,
) -> impl IntoResponse {
    if !peer.ip().is_loopback() {
        return (
            StatusCode::FORBIDDEN,
            "the log level can only be changed from loopback (e.g. kubectl port-forward)\n"
                .to_string(),
        );
    }
    match crate::logging::set_filter(&body) {
        Ok(filter) => {
            tracing::warn!(%filter, "log filter changed");
            (StatusCode::OK, format!("{filter}\n"))
        }
        Err(problem) => (StatusCode::BAD_REQUEST, format!("{problem}\n")),
    }
}

fn manifest_status(state: &HttpState) -> ManifestStatus {
    state
        .manifests
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone()
}

async fn readyz(State(state): State<HttpState>) -> impl IntoResponse {
    // Checked first: a controller that cannot make a share durable acknowledges none, and
    // the operator (or a probe) should see why rather than a plain "not ready".
    if let StoreHealth::Failed { reason } = state.store.health() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({
                "ready": false,
                "store": "failed",
                "reason": format!("store: {reason}"),
                "role": state.role,
            })),
        );
    }
    if state.ready.load(Ordering::Acquire) {
        // A pool outage does not make the controller unready: agents must still reach it
        // (to keep their sessions and hand in shares), so the pools are reported, not
        // judged.
        let sources: serde_json::Map<String, serde_json::Value> = state
            .fleet
            .view()
            .miners
            .iter()
            .map(|m| {
                let source = match &m.status.pool {
                    Some(pool) => json!({"kind": "stratum", "connected": pool.state == "Connected", "pool": pool.url}),
                    None => json!({"kind": "builtin", "connected": true}),
                };
                (m.key.clone(), source)
            })
            .collect();
        (
            StatusCode::OK,
            Json(
                json!({"ready": true, "store": "open", "role": state.role, "workSources": sources}),
            ),
        )
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"ready": false})),
        )
    }
}

/// The Prometheus text format's content type.
const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

async fn metrics(State(state): State<HttpState>) -> axum::response::Response {
    let Some(metrics) = state.metrics else {
        return (StatusCode::NOT_FOUND, "metrics are not set up\n").into_response();
    };
    // Gathering walks the fleet; keep it off the async workers.
    let encoded = tokio::task::spawn_blocking(move || metrics.encode()).await;
    match encoded {
        Ok(Ok(mut text)) => {
            text.push_str(SERVING);
            ([(CONTENT_TYPE, PROMETHEUS_TEXT)], text).into_response()
        }
        Ok(Err(e)) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")).into_response(),
    }
}

/// Whether this process serves (standalone or leader: 1) or stands by (0): the one series
/// a standby has, so a dashboard shows every replica and which one leads.
const SERVING: &str = "# HELP micromine_controller_serving Whether this controller process serves agents (1) or stands by (0)\n# TYPE micromine_controller_serving gauge\nmicromine_controller_serving 1\n";
const STANDING_BY: &str = "# HELP micromine_controller_serving Whether this controller process serves agents (1) or stands by (0)\n# TYPE micromine_controller_serving gauge\nmicromine_controller_serving 0\n";

async fn status(State(state): State<HttpState>) -> impl IntoResponse {
    let view = state.fleet.view();
    Json(json!({
        "miners": view.miners,
        "devices": view.devices,
        "totals": view.totals,
        "sessions": view.sessions,
        "assignments": view.assignments,
        "manifests": manifest_status(&state),
    }))
}

async fn microminers(State(state): State<HttpState>) -> impl IntoResponse {
    let view = state.fleet.view();
    let items: Vec<_> = view
        .miners
        .into_iter()
        .map(|m| {
            let (namespace, name) = m.key.split_once('/').unwrap_or(("default", &m.key));
            json!({
                "apiVersion": API_VERSION,
                "kind": "MicroMiner",
                "metadata": {"name": name, "namespace": namespace},
                "status": m.status,
            })
        })
        .collect();
    Json(json!({"apiVersion": "v1", "kind": "List", "items": items}))
}

async fn edgedevices(State(state): State<HttpState>) -> impl IntoResponse {
    let view = state.fleet.view();
    Json(json!({"apiVersion": "v1", "kind": "List", "items": view.devices}))
}

async fn assignments(State(state): State<HttpState>) -> impl IntoResponse {
    Json(json!({"items": state.fleet.leases()}))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use axum::body::Body;
    use axum::extract::connect_info::MockConnectInfo;
    use axum::http::Request;
    use tower::ServiceExt;

    #[tokio::test]
    async fn the_log_filter_cannot_be_changed_from_another_machine() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("store.redb")).unwrap();
        let ledger = micromine_store::ledger::Ledger::open(store.clone()).unwrap();
        let fleet = Fleet::open(store.clone(), ledger).await.unwrap();
        let state = HttpState {
            fleet,
            manifests: Arc::default(),
            ready: Arc::default(),
            role: "standalone",
            metrics: None,
            store,
        };
        let remote = SocketAddr::from(([10, 1, 2, 3], 40000));
        let app = router(state).layer(MockConnectInfo(remote));
        let request = Request::put("/loglevel").body(Body::from("trace")).unwrap();
        let response = app.clone().oneshot(request).await.unwrap();
        assert_eq!(response.status(), StatusCode::FORBIDDEN);
        // Without metrics set up, /metrics says so rather than serving an empty page.
        let request = Request::get("/metrics").body(Body::empty()).unwrap();
        assert_eq!(
            app.oneshot(request).await.unwrap().status(),
            StatusCode::NOT_FOUND
        );
    }
}
