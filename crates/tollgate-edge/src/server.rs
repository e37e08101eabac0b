//! The edge's listeners: gRPC (Enforcement and the Envoy adapter behind API-key auth, plus
//! health and reflection) and HTTP (`/metrics`). Graceful shutdown stops accepting, lets calls
//! in flight finish, then flushes every cached decision and returns every lease.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_server::RateLimitServiceServer;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tollgate_proto::pb;
use tollgate_region::RegionStore;
use tollgate_serve::auth::{AuthLayer, KeyRing};
use tollgate_serve::limits::RequestSizeLayer;
use tonic::transport::ServerTlsConfig;
use tower::limit::GlobalConcurrencyLimitLayer;
use tower::Layer;
use tracing::info;

use crate::engine::Engine;
use crate::envoy::{DescriptorKeys, EnvoyRateLimit};
use crate::metrics::Metrics;
use crate::service::EnforcementService;

/// Largest request message accepted, in bytes.
pub const REQUEST_BYTES_MAX: usize = 256 * 1024;
pub const REQUEST_TIMEOUT_MS_DEFAULT: u64 = 2_000;
pub const IN_FLIGHT_MAX_DEFAULT: usize = 4_096;

#[derive(Clone, Debug)]
pub struct ServeLimits {
    /// Longest a call may run before it is cut off.
    pub request_timeout_ms: u64,
    /// Calls in flight across all connections; beyond it calls are shed (RESOURCE_EXHAUSTED
    /// or UNAVAILABLE) instead of queueing without bound.
    pub in_flight_max: usize,
}

impl Default for ServeLimits {
    fn default() -> Self {
        ServeLimits {
            request_timeout_ms: REQUEST_TIMEOUT_MS_DEFAULT,
            in_flight_max: IN_FLIGHT_MAX_DEFAULT,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("grpc server: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("http server: {0}")]
    Http(#[from] std::io::Error),
}

/// Serves the edge's gRPC calls on `listener` until `shutdown` resolves, then flushes.
pub async fn serve_grpc<S: RegionStore>(
    listener: TcpListener,
    engine: Arc<Engine<S>>,
    metrics: Arc<Metrics>,
    keys: Arc<KeyRing>,
    limits: ServeLimits,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    serve_grpc_with_tls(listener, None, engine, metrics, keys, limits, shutdown).await
}

/// [`serve_grpc`], speaking TLS when `tls` is set (and requiring client certificates when it
/// names a client CA).
pub async fn serve_grpc_with_tls<S: RegionStore>(
    listener: TcpListener,
    tls: Option<ServerTlsConfig>,
    engine: Arc<Engine<S>>,
    metrics: Arc<Metrics>,
    keys: Arc<KeyRing>,
    limits: ServeLimits,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    let mut server = tonic::transport::Server::builder();
    if let Some(tls) = tls {
        server = server.tls_config(tls)?;
    }
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<pb::enforcement_server::EnforcementServer<EnforcementService<S>>>()
        .await;
    let reflection_v1 = tollgate_serve::reflection().build_v1()?;
    let reflection_v1alpha = tollgate_serve::reflection().build_v1alpha()?;
    let enforcement = pb::enforcement_server::EnforcementServer::new(EnforcementService::new(
        Arc::clone(&engine),
        metrics,
    ))
    .max_decoding_message_size(REQUEST_BYTES_MAX);
    let envoy = RateLimitServiceServer::new(EnvoyRateLimit::new(
        Arc::clone(&engine),
        DescriptorKeys::default(),
    ))
    .max_decoding_message_size(REQUEST_BYTES_MAX);
    let auth = AuthLayer::new(keys);
    let size = RequestSizeLayer::new(REQUEST_BYTES_MAX);

    server
        // Cut off calls that run too long instead of holding their resources forever.
        .timeout(Duration::from_millis(limits.request_timeout_ms))
        // Shed what does not fit instead of queueing it.
        .load_shed(true)
        // Bound the calls in flight across every connection.
        .layer(GlobalConcurrencyLimitLayer::new(limits.in_flight_max))
        // Decisions are small and latency-bound: send them at once.
        .tcp_nodelay(true)
        // Health and reflection answer anyone; enforcement calls need an `enforce` key, and
        // a request message over the size limit is refused before it is read.
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(size.layer(auth.layer(enforcement)))
        .add_service(size.layer(auth.layer(envoy)))
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown)
        .await?;
    info!("grpc listener stopped; flushing cached decisions and returning leases");
    engine.shutdown().await;
    Ok(())
}

/// Serves `GET /metrics` (Prometheus text) until `shutdown` resolves.
pub async fn serve_metrics<S: RegionStore>(
    listener: TcpListener,
    engine: Arc<Engine<S>>,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    axum::serve(listener, metrics_router(engine, metrics))
        .with_graceful_shutdown(shutdown)
        .await?;
    Ok(())
}

/// `GET /metrics` as a router, for nodes that serve more routes on the same HTTP listener.
pub fn metrics_router<S: RegionStore>(
    engine: Arc<Engine<S>>,
    metrics: Arc<Metrics>,
) -> axum::Router {
    let render = move || {
        let leases = engine.leases();
        metrics.render(
            leases.stats(),
            leases.pending(),
            engine.catalogue().price_generation(),
        )
    };
    axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let text = render();
            async move {
                (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        "text/plain; version=0.0.4",
                    )],
                    text,
                )
            }
        }),
    )
}
