//! HTTP: the operator's window on REST_PORT.
//!
//! - `/metrics`: Prometheus text; the gauges are set from the pipeline's state at each scrape.
//! - `/healthz`: 200 while the process runs.
//! - `/readyz`: 200 when partitions are assigned, the store is reachable and archiving has not
//!   stopped; otherwise 503 with the reasons, one per line.
//! - `/status`: JSON, per partition the committed and end offsets, lag, spooled records and last
//!   error; the last errors; the spool against its bounds; what the archiver was started with.
//! - `/`: the status page for a browser ([`page`]), Kafka Connect's worker info for other clients.
//! - `/connectors…`, `/connector-plugins`: the Kafka Connect REST API ([`crate::connect`]).
//!
//! Unknown paths and methods answer in Kafka Connect's error shape, as the rest of the port does.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::Request;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, ServiceExt};
use metrics_exporter_prometheus::PrometheusHandle;
use tokio_util::sync::CancellationToken;
use tower::Layer;
use tower_http::normalize_path::NormalizePathLayer;

use crate::connect;
use crate::pipeline::commit::{Ledger, PartitionView};
use crate::pipeline::spool::Spool;
use crate::pipeline::status::Status;

mod page;

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
    /// The connectors' configuration, for the Kafka Connect API.
    pub connectors: Arc<connect::Configs>,
}

#[derive(Clone)]
struct App {
    view: View,
}

impl View {
    /// The assigned partitions' figures, copied out of the ledger: its lock, which the consumer
    /// and the uploads take, is held for the copy alone.
    fn assigned(&self) -> Vec<PartitionView> {
        self.ledger.lock().expect("ledger lock").assigned()
    }
}

/// Binds the listener now, so a port in use is a start-up error; serves until `shutdown`.
pub async fn serve(
    addr: SocketAddr,
    view: View,
    shutdown: CancellationToken,
) -> Result<impl Future<Output = ()>, HttpError> {
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(|source| HttpError { addr, source })?;
    let api = connect::Api {
        status: view.status.clone(),
        ledger: view.ledger.clone(),
        worker_id: format!("{}:{}", hostname(), addr.port()),
        configs: view.connectors.clone(),
    };
    let router = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/status", get(status))
        .route("/", get(root))
        .with_state(App { view })
        .merge(connect::routes(api))
        .fallback(|| async { connect::error(StatusCode::NOT_FOUND, "HTTP 404 Not Found") })
        .method_not_allowed_fallback(|| async {
            connect::error(StatusCode::METHOD_NOT_ALLOWED, "HTTP 405 Method Not Allowed")
        });
    // Kafka Connect (Jersey) takes a path with a trailing slash as the path without it; some
    // clients send one (`GET /connectors/{name}/`).
    let app = NormalizePathLayer::trim_trailing_slash().layer(router);
    Ok(async move {
        let served = axum::serve(listener, ServiceExt::<Request>::into_make_service(app))
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await;
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
    v.status.set_gauges(&v.assigned(), &v.spool);
    v.metrics.render()
}

async fn readyz(State(app): State<App>) -> Response {
    let any_assigned = app.view.ledger.lock().expect("ledger lock").any_assigned();
    let why = app.view.status.not_ready(any_assigned);
    if why.is_empty() {
        "ready\n".into_response()
    } else {
        let body: String = why.iter().map(|w| format!("not ready: {w}\n")).collect();
        (StatusCode::SERVICE_UNAVAILABLE, body).into_response()
    }
}

async fn root(State(app): State<App>, headers: HeaderMap) -> Response {
    let answer = if page::wants_page(&headers) { page::page() } else { connect::server_info(&app.view.status) };
    page::vary_on_accept(answer)
}

async fn status(State(app): State<App>) -> Response {
    let v = &app.view;
    let report = v.status.report(&v.assigned(), &v.spool, v.spool.disk_space());
    Json(report).into_response()
}
