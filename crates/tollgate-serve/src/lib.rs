//! What every Tollgate gRPC node needs around its services: API-key authentication with scopes,
//! request size limits and the audit of Admin changes (tower layers), TLS settings, and the
//! signal that starts a graceful shutdown.
//!
//! Depends on `tollgate-proto` for the error table only; never on a node's own crates.

pub mod audit;
pub mod auth;
pub mod limits;
pub mod tls;

/// Server reflection, answering for the whole Tollgate contract, Envoy's rate-limit service
/// (the edges and the embedded node answer it) and gRPC health; build it with `build_v1()` and
/// `build_v1alpha()` (every node serves both).
pub fn reflection() -> tonic_reflection::server::Builder<'static> {
    tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(tollgate_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tollgate_proto::ENVOY_RATE_LIMIT_FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
}

/// Resolves on SIGTERM or Ctrl-C, the start of a graceful shutdown.
pub async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let terminate = async {
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(mut signal) => {
                    signal.recv().await;
                }
                Err(error) => {
                    tracing::warn!(%error, "cannot listen for SIGTERM");
                    std::future::pending::<()>().await;
                }
            }
        };
        tokio::select! {
            _ = interrupt => {}
            _ = terminate => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = interrupt.await;
    }
}
