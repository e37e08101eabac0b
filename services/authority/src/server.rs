//! The authority's gRPC listener: Admin behind API-key auth, plus health and reflection.

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tollgate_authority::StateStore;
use tollgate_ledger::LedgerStore;
use tollgate_proto::pb;
use tollgate_serve::audit::{Audit, AuditLayer};
use tollgate_serve::auth::Auth;
use tollgate_serve::limits::{RequestSize, RequestSizeLayer};
use tonic::transport::ServerTlsConfig;
use tower::{Layer, ServiceBuilder};

use crate::admin::{AdminService, Clock};
use crate::auth::{AuthLayer, KeyRing};

/// Largest request message accepted, in bytes.
pub const REQUEST_BYTES_MAX: usize = 1024 * 1024;
/// Longest a request may run before it is cut off, in milliseconds.
pub const REQUEST_TIMEOUT_MS: u64 = 30_000;
/// Requests in flight per connection; more wait for a slot.
pub const IN_FLIGHT_PER_CONNECTION_MAX: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("grpc server: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("audit: {0}")]
    Audit(String),
}

/// The Admin service as every node serves it, outermost layer first.
pub type AdminStack = RequestSize<Audit<Auth<pb::admin_server::AdminServer<AdminService>>>>;

/// Wraps an Admin service in the layers no Admin call may skip.
pub fn admin_stack(admin: AdminService, keys: Arc<KeyRing>, audit: AuditLayer) -> AdminStack {
    ServiceBuilder::new()
        // Refuse a request message over the limit before it is read into memory.
        .layer(RequestSizeLayer::new(REQUEST_BYTES_MAX))
        // Record every change that succeeds, and every refusal of a known key.
        .layer(audit)
        // Reject callers without a key whose scope allows the call.
        .layer(AuthLayer::new(keys))
        .service(
            pb::admin_server::AdminServer::new(admin).max_decoding_message_size(REQUEST_BYTES_MAX),
        )
}

/// A gRPC server builder with the authority's limits, and TLS when configured.
pub fn server_builder(
    tls: Option<ServerTlsConfig>,
) -> Result<tonic::transport::Server, ServeError> {
    let mut server = tonic::transport::Server::builder();
    if let Some(tls) = tls {
        server = server.tls_config(tls)?;
    }
    Ok(server
        // Cut off requests that run too long instead of holding their resources forever.
        .timeout(Duration::from_millis(REQUEST_TIMEOUT_MS))
        // Bound the work one connection can put in flight.
        .concurrency_limit_per_connection(IN_FLIGHT_PER_CONNECTION_MAX))
}

/// Serves Admin over the ledger alone until `shutdown` resolves; changes are audited into
/// `state`.
pub async fn serve(
    listener: TcpListener,
    store: Arc<dyn LedgerStore>,
    state: StateStore,
    keys: Arc<KeyRing>,
    clock: Arc<dyn Clock>,
    tls: Option<ServerTlsConfig>,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<pb::admin_server::AdminServer<AdminService>>()
        .await;
    let reflection_v1 = tollgate_serve::reflection().build_v1()?;
    let reflection_v1alpha = tollgate_serve::reflection().build_v1alpha()?;
    let audit = crate::audit::admin_audit_layer(state.clone(), Arc::clone(&clock))?;
    let admin = AdminService::new(store, clock).with_audit(state);

    server_builder(tls)?
        // Health and reflection answer anyone; Admin needs a key with the right scope.
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(admin_stack(admin, keys, audit))
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown)
        .await?;
    Ok(())
}

/// Serves a full authority until `shutdown` resolves: Admin (with the lifecycle calls) and
/// Coordination behind API-key auth, health and reflection, and the background loops that
/// reconcile every region, allocate, run the lifecycle, top-ups and notifications. After the
/// listener stops, one last reconciliation round takes in what edges flushed meanwhile.
pub async fn serve_authority<R: tollgate_region::RegionStore>(
    listener: TcpListener,
    ledger: Arc<dyn LedgerStore>,
    keys: Arc<KeyRing>,
    authority: Arc<tollgate_authority::Authority<dyn LedgerStore, R>>,
    clock: Arc<dyn Clock>,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    let channel = tokio::sync::mpsc::channel(crate::admin::CHANGES_CHANNEL_CAPACITY);
    serve_authority_with_changes(
        listener, ledger, keys, authority, clock, channel, None, shutdown,
    )
    .await
}

/// [`serve_authority`], with the channel of changed accounts made by the caller, so that
/// other listeners (the payment webhooks) can tell the authority what they changed too, and
/// TLS when configured.
// The parts of a node are passed as they are built in `main`; a struct would only rename them.
#[allow(clippy::too_many_arguments)]
pub async fn serve_authority_with_changes<R: tollgate_region::RegionStore>(
    listener: TcpListener,
    ledger: Arc<dyn LedgerStore>,
    keys: Arc<KeyRing>,
    authority: Arc<tollgate_authority::Authority<dyn LedgerStore, R>>,
    clock: Arc<dyn Clock>,
    (changes, changed): (
        tokio::sync::mpsc::Sender<tollgate_core::AccountId>,
        tokio::sync::mpsc::Receiver<tollgate_core::AccountId>,
    ),
    tls: Option<ServerTlsConfig>,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    // Everything that can fail at start fails before the background loops run.
    let audit = crate::audit::admin_audit_layer(authority.state().clone(), Arc::clone(&clock))?;
    let mut server = server_builder(tls)?;
    let reflection_v1 = tollgate_serve::reflection().build_v1()?;
    let reflection_v1alpha = tollgate_serve::reflection().build_v1alpha()?;
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let background = tokio::spawn(crate::background::run(
        Arc::clone(&authority),
        changed,
        stopped,
    ));
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<pb::admin_server::AdminServer<AdminService>>()
        .await;
    let state = authority.state().clone();
    let admin = AdminService::new(ledger, clock)
        .with_changes(changes)
        .with_lifecycle(authority.clone())
        .with_audit(state);
    let coordination = pb::coordination_server::CoordinationServer::new(
        crate::coordination::CoordinationService::new(Arc::clone(&authority)),
    )
    .max_decoding_message_size(REQUEST_BYTES_MAX);
    let auth = AuthLayer::new(Arc::clone(&keys));
    let size = RequestSizeLayer::new(REQUEST_BYTES_MAX);
    let stopping = async move {
        shutdown.await;
        let _ = stop.send(true);
    };
    server
        // Health and reflection answer anyone; Admin and Coordination need a key.
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(admin_stack(admin, keys, audit))
        .add_service(size.layer(auth.layer(coordination)))
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), stopping)
        .await?;
    let _ = background.await;
    if let Err(error) = authority
        .reconcile_all(crate::background::RECONCILE_PASSES_MAX)
        .await
    {
        tracing::warn!(%error, "last reconciliation round failed");
    }
    Ok(())
}
