//! HTTP: the operator's window on REST_PORT: `/metrics` (Prometheus text) and `/healthz`.

use std::net::SocketAddr;

use axum::Router;
use axum::routing::get;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio_util::sync::CancellationToken;

#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {addr} (REST_PORT / REST_BIND_ADDRESS): {source}")]
pub struct HttpError {
    pub addr: SocketAddr,
    pub source: std::io::Error,
}

/// Binds the listener now, so a port in use is a start-up error; serves until `shutdown`.
pub async fn serve(
    addr: SocketAddr,
    metrics: PrometheusHandle,
    shutdown: CancellationToken,
) -> Result<impl Future<Output = ()>, HttpError> {
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(|source| HttpError { addr, source })?;
    let app = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/metrics", get(move || std::future::ready(metrics.render())));
    Ok(async move {
        let served = axum::serve(listener, app).with_graceful_shutdown(shutdown.cancelled_owned()).await;
        if let Err(e) = served {
            tracing::error!(error = %e, "HTTP server stopped");
        }
    })
}
