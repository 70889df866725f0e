//! HTTP: the operator's window on REST_PORT.
//!
//! - `/metrics`: Prometheus text; the gauges are set from the pipeline's state at each scrape.
//! - `/healthz`: 200 while the process runs.
//! - `/readyz`: 200 when partitions are assigned, the store is reachable and archiving has not
//!   stopped; otherwise 503 with the reasons, one per line.
//! - `/status`: JSON, per partition the committed and end offsets, lag, spooled records and last error.
//! - `/connectors…`: the status endpoints of the Kafka Connect REST API that the old deployment's
//!   users script against, answering for its two connectors `s3-sink-timestamp` and `s3-sink-data`.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::Json;
use axum::Router;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use metrics_exporter_prometheus::PrometheusHandle;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::commit::Ledger;
use crate::spool::Spool;
use crate::status::Status;

/// The names under which the Kafka Connect deployment ran its two sink connectors.
pub const CONNECTORS: [&str; 2] = ["s3-sink-timestamp", "s3-sink-data"];

#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {addr} (REST_PORT / REST_BIND_ADDRESS): {source}")]
pub struct HttpError {
    pub addr: SocketAddr,
    pub source: std::io::Error,
}

/// What the endpoints read.
#[derive(Clone)]
pub struct View {
    pub metrics: PrometheusHandle,
    pub status: Arc<Status>,
    pub ledger: Arc<Mutex<Ledger>>,
    pub spool: Arc<Spool>,
}

#[derive(Clone)]
struct App {
    view: View,
    /// `host:port`, as Kafka Connect names a worker.
    worker_id: String,
}

/// Binds the listener now, so a port in use is a start-up error; serves until `shutdown`.
pub async fn serve(
    addr: SocketAddr,
    view: View,
    shutdown: CancellationToken,
) -> Result<impl Future<Output = ()>, HttpError> {
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(|source| HttpError { addr, source })?;
    let app = App { view, worker_id: format!("{}:{}", hostname(), addr.port()) };
    let router = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/status", get(status))
        .route("/connectors", get(|| async { Json(CONNECTORS) }))
        .route("/connectors/{name}/status", get(connector_status))
        .route("/connectors/{name}/tasks/{task}/status", get(task_status))
        .with_state(app);
    Ok(async move {
        let served = axum::serve(listener, router).with_graceful_shutdown(shutdown.cancelled_owned()).await;
        if let Err(e) = served {
            tracing::error!(error = %e, "HTTP server stopped");
        }
    })
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".to_string())
}

async fn metrics(State(app): State<App>) -> String {
    let v = &app.view;
    v.status.set_gauges(&v.ledger.lock().expect("ledger lock"), &v.spool);
    v.metrics.render()
}

async fn readyz(State(app): State<App>) -> Response {
    let why = app.view.status.not_ready(&app.view.ledger.lock().expect("ledger lock"));
    if why.is_empty() {
        "ready\n".into_response()
    } else {
        let body: String = why.iter().map(|w| format!("not ready: {w}\n")).collect();
        (StatusCode::SERVICE_UNAVAILABLE, body).into_response()
    }
}

async fn status(State(app): State<App>) -> Response {
    let v = &app.view;
    let report = v.status.report(&v.ledger.lock().expect("ledger lock"), &v.spool);
    Json(report).into_response()
}

/// One task's state in Kafka Connect's shape: RUNNING, or FAILED with a trace.
fn task_state(app: &App, id: Option<u32>) -> serde_json::Value {
    let mut state = json!({ "state": "RUNNING", "worker_id": app.worker_id });
    if let Some(id) = id {
        state["id"] = json!(id);
    }
    if let Some(failure) = app.view.status.failure() {
        state["state"] = json!("FAILED");
        state["trace"] = json!(format!("{} (at {})", failure.message, failure.time));
    }
    state
}

fn not_found(message: String) -> Response {
    (StatusCode::NOT_FOUND, Json(json!({ "error_code": 404, "message": message }))).into_response()
}

async fn connector_status(State(app): State<App>, Path(name): Path<String>) -> Response {
    if !CONNECTORS.contains(&name.as_str()) {
        return not_found(format!("No status found for connector {name}"));
    }
    // One pipeline writes both connectors' objects, so both share its state.
    Json(json!({
        "name": name,
        "connector": task_state(&app, None),
        "tasks": [task_state(&app, Some(0))],
        "type": "sink",
    }))
    .into_response()
}

async fn task_status(State(app): State<App>, Path((name, task)): Path<(String, String)>) -> Response {
    if !CONNECTORS.contains(&name.as_str()) {
        return not_found(format!("No status found for connector {name}"));
    }
    if task != "0" {
        return not_found(format!("No status found for task {name}-{task}"));
    }
    Json(task_state(&app, Some(0))).into_response()
}
