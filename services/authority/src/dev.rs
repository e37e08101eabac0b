//! `tollgate-authority dev`: the embedded single node. The authority and one edge in one
//! process, on SQLite (in the data directory) and the in-memory regional store, with nothing
//! else to install. Enforcement, the Envoy adapter, Admin, Coordination, gRPC health and
//! reflection share one listener; `/metrics`, the admin console (`/console`) and the balance
//! widget (`/widget`) are on the HTTP listener.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_server::RateLimitServiceServer;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tollgate_authority::{Authority, AuthoritySettings, StateStore, SystemClock};
use tollgate_core::RegionId;
use tollgate_edge::envoy::{DescriptorKeys, EnvoyRateLimit};
use tollgate_edge::metrics::Metrics;
use tollgate_edge::service::EnforcementService;
use tollgate_edge::{EdgeSettings, Engine};
use tollgate_ledger::{LedgerStore, SqliteLedger};
use tollgate_proto::pb;
use tollgate_region::{MemoryRegionStore, RETAIN_MS_DEFAULT};
use tollgate_serve::auth::{key_digest, AuthLayer, KeyEntry, KeyRing, Scope};
use tower::Layer;
use tracing::info;

use crate::admin::{AdminService, CHANGES_CHANNEL_CAPACITY};
use crate::coordination::{CoordinationService, LocalAllocator};
use crate::server::{admin_stack, REQUEST_BYTES_MAX, REQUEST_TIMEOUT_MS};
use tollgate_serve::limits::RequestSizeLayer;
use tonic::transport::ServerTlsConfig;

pub const LISTEN_DEFAULT: &str = "127.0.0.1:50051";
pub const HTTP_LISTEN_DEFAULT: &str = "127.0.0.1:9090";
pub const DATA_DEFAULT: &str = "tollgate-data";
/// The embedded node's one region.
pub const REGION: &str = "local";
/// Random bytes in a generated development key.
const DEV_KEY_BYTES: usize = 24;

pub struct DevOptions {
    pub listen: SocketAddr,
    pub http_listen: SocketAddr,
    pub data: PathBuf,
    /// `TOLLGATE_DEV_API_KEY`, if set.
    pub api_key: Option<String>,
    /// The Stripe endpoint secret (`TOLLGATE_STRIPE_WEBHOOK_SECRET`); without it
    /// `POST /webhooks/stripe` answers 503.
    pub stripe_webhook_secret: Option<String>,
}

/// A fresh key, from the operating system's randomness.
pub fn generate_key() -> anyhow::Result<String> {
    let mut bytes = [0_u8; DEV_KEY_BYTES];
    getrandom::fill(&mut bytes).map_err(|e| anyhow::anyhow!("no randomness for a key: {e}"))?;
    Ok(format!("tg_dev_{}", hex::encode(bytes)))
}

/// The development key may do everything: enforce, read and administer; `extra` keys (a
/// test's `read` key) come after it.
fn key_ring(key: &str, extra: Vec<KeyEntry>) -> KeyRing {
    let digest = key_digest(key);
    let entry = |scope| KeyEntry {
        name: "dev".to_owned(),
        digest,
        scope,
    };
    let mut keys = vec![
        entry(Scope::Enforce),
        entry(Scope::Read),
        entry(Scope::Admin),
    ];
    keys.extend(extra);
    KeyRing::new(keys)
}

pub async fn run(
    options: DevOptions,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    run_with(options, None, Vec::new(), shutdown).await
}

/// [`run`], with TLS on the gRPC listener when `tls` is set.
pub async fn run_with_tls(
    options: DevOptions,
    tls: Option<ServerTlsConfig>,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    run_with(options, tls, Vec::new(), shutdown).await
}

/// [`run`], accepting `extra_keys` besides the development key (each with its own name and
/// scope, for the console's sign-in).
pub async fn run_with_keys(
    options: DevOptions,
    extra_keys: Vec<KeyEntry>,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    run_with(options, None, extra_keys, shutdown).await
}

/// [`run`] with TLS when `tls` is set and `extra_keys` besides the development key.
pub async fn run_with(
    options: DevOptions,
    tls: Option<ServerTlsConfig>,
    extra_keys: Vec<KeyEntry>,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(&options.data)
        .with_context(|| format!("creating {}", options.data.display()))?;
    let ledger: Arc<dyn LedgerStore> = Arc::new(
        SqliteLedger::open(&options.data.join("ledger.db"))
            .await
            .context("opening the SQLite ledger")?,
    );
    let state_url = format!("sqlite://{}", options.data.join("authority.db").display());
    let state = StateStore::connect(&state_url)
        .await
        .context("opening the authority's state")?;
    let region = RegionId::new(REGION).context("region name")?;
    let store = Arc::new(MemoryRegionStore::new(RETAIN_MS_DEFAULT));
    let regions = BTreeMap::from([(region.clone(), Arc::clone(&store))]);
    let authority = Arc::new(Authority::new(
        Arc::clone(&ledger),
        state,
        regions,
        Arc::new(SystemClock),
        AuthoritySettings::default(),
    ));
    // The region lives in memory and starts empty, while the authority's counters still say
    // it holds what the previous run allocated. That run reconciled what it could on the way
    // out (a crash loses its unreconciled usage with the region), so the ledger's remainder is
    // now the account's to allocate again, in burn-down order.
    authority
        .forget_region_holdings(&region)
        .await
        .context("forgetting what the previous run's region held")?;
    let engine = Engine::new(
        store,
        EdgeSettings::new(region.clone()),
        Arc::new(tollgate_edge::SystemClock),
    )
    .with_allocator(Arc::new(LocalAllocator::new(
        Arc::clone(&authority),
        region,
    )));
    let engine = Arc::new(engine);
    let edge_tasks = engine.start().await;
    let metrics = Arc::new(Metrics::new().context("metrics")?);

    let (generated, key) = match options.api_key {
        Some(key) => (false, key),
        None => (true, generate_key()?),
    };
    crate::dev_keys::check_distinct(&key, &extra_keys)?;
    let extra_described = crate::dev_keys::describe(&extra_keys);
    let keys = Arc::new(key_ring(&key, extra_keys));
    let grpc = TcpListener::bind(options.listen)
        .await
        .with_context(|| format!("binding {}", options.listen))?;
    let http = TcpListener::bind(options.http_listen)
        .await
        .with_context(|| format!("binding {}", options.http_listen))?;
    print_welcome(
        grpc.local_addr()?,
        http.local_addr()?,
        &options.data,
        &key,
        generated,
        &extra_described,
        if options.stripe_webhook_secret.is_some() {
            "signed with TOLLGATE_STRIPE_WEBHOOK_SECRET"
        } else {
            "answers 503: TOLLGATE_STRIPE_WEBHOOK_SECRET is not set"
        },
    );

    let (changes_tx, changes_rx) = tokio::sync::mpsc::channel(CHANGES_CHANNEL_CAPACITY);
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let background = tokio::spawn(crate::background::run(
        Arc::clone(&authority),
        changes_rx,
        stopped.clone(),
    ));
    // One HTTP listener: /metrics and the payment provider's webhooks.
    let stripe = crate::purchases::StripeWebhook::new(
        Arc::clone(&ledger),
        Arc::new(SystemClock),
        options.stripe_webhook_secret,
        tollgate_authority::stripe::TOLERANCE_S_DEFAULT,
    )
    .with_changes(changes_tx.clone());
    // The console and the widget, on the same Admin code as the gRPC listener.
    let console = crate::console::Console::new(
        AdminService::new(Arc::clone(&ledger), Arc::new(SystemClock))
            .with_changes(changes_tx.clone())
            .with_lifecycle(authority.clone())
            .with_audit(authority.state().clone()),
        Arc::clone(&ledger),
        Some(authority.clone()),
        Arc::new(SystemClock),
        Arc::clone(&keys),
        vec![RegionId::new(REGION).context("region name")?],
    )
    .map_err(|e| anyhow::anyhow!("no randomness for the console: {e}"))?;
    // /metrics: the edge's metrics, then the authority's (parked usage, the region's stream,
    // allocations, the outbox) read at scrape time.
    let edge_metrics = {
        let (engine, metrics) = (Arc::clone(&engine), Arc::clone(&metrics));
        move || {
            let leases = engine.leases();
            metrics.render(
                leases.stats(),
                leases.pending(),
                engine.catalogue().price_generation(),
            )
        }
    };
    let http_routes = crate::metrics::router(Arc::clone(&authority), Arc::new(edge_metrics))
        .merge(stripe.router())
        .merge(Arc::new(console).router());
    let metrics_task = tokio::spawn(crate::purchases::serve_http(
        http,
        http_routes,
        wait(stopped.clone()),
    ));

    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<pb::admin_server::AdminServer<AdminService>>()
        .await;
    health
        .set_serving::<pb::enforcement_server::EnforcementServer<EnforcementService<MemoryRegionStore>>>()
        .await;
    let state = authority.state().clone();
    let audit = crate::audit::admin_audit_layer(state.clone(), Arc::new(SystemClock))?;
    let admin = AdminService::new(Arc::clone(&ledger), Arc::new(SystemClock))
        .with_changes(changes_tx)
        .with_lifecycle(authority.clone())
        .with_audit(state);
    let auth = AuthLayer::new(Arc::clone(&keys));
    let size = RequestSizeLayer::new(REQUEST_BYTES_MAX);
    let stopping = async move {
        shutdown.await;
        info!("shutting down");
        let _ = stop.send(true);
    };
    let mut server = tonic::transport::Server::builder();
    if let Some(tls) = tls {
        server = server.tls_config(tls).context("the TLS configuration")?;
    }
    server
        // Cut off calls that run too long instead of holding their resources forever.
        .timeout(Duration::from_millis(REQUEST_TIMEOUT_MS))
        // Health and reflection answer anyone; every other service needs the key, and no
        // request message may be over the size limit.
        .add_service(health_service)
        .add_service(tollgate_serve::reflection().build_v1()?)
        .add_service(tollgate_serve::reflection().build_v1alpha()?)
        .add_service(
            size.layer(
                auth.layer(
                    pb::enforcement_server::EnforcementServer::new(EnforcementService::new(
                        Arc::clone(&engine),
                        Arc::clone(&metrics),
                    ))
                    .max_decoding_message_size(REQUEST_BYTES_MAX),
                ),
            ),
        )
        .add_service(
            size.layer(
                auth.layer(
                    RateLimitServiceServer::new(EnvoyRateLimit::new(
                        Arc::clone(&engine),
                        DescriptorKeys::default(),
                    ))
                    .max_decoding_message_size(REQUEST_BYTES_MAX),
                ),
            ),
        )
        .add_service(admin_stack(admin, keys, audit))
        .add_service(
            size.layer(
                auth.layer(
                    pb::coordination_server::CoordinationServer::new(CoordinationService::new(
                        Arc::clone(&authority),
                    ))
                    .max_decoding_message_size(REQUEST_BYTES_MAX),
                ),
            ),
        )
        .serve_with_incoming_shutdown(TcpListenerStream::new(grpc), stopping)
        .await?;
    engine.shutdown().await;
    metrics_task.await??;
    let _ = background.await;
    // One last round so what the edge flushed on shutdown reaches the ledger.
    authority
        .reconcile_all(crate::background::RECONCILE_PASSES_MAX)
        .await?;
    edge_tasks.iter().for_each(|task| task.abort());
    info!("stopped");
    Ok(())
}

async fn wait(mut stopped: tokio::sync::watch::Receiver<bool>) {
    let _ = stopped.wait_for(|stopped| *stopped).await;
}

fn print_welcome(
    grpc: SocketAddr,
    http: SocketAddr,
    data: &std::path::Path,
    key: &str,
    generated: bool,
    extra_keys: &[String],
    stripe: &str,
) {
    let origin = if generated {
        "generated for this run; set TOLLGATE_DEV_API_KEY to choose your own"
    } else {
        "from TOLLGATE_DEV_API_KEY"
    };
    let extra_keys = if extra_keys.is_empty() {
        "none (TOLLGATE_DEV_EXTRA_KEYS=name:scope[+scope]:secret,… or --keys FILE)".to_owned()
    } else {
        extra_keys.join(", ")
    };
    println!(
        "\
Tollgate embedded node (authority + edge, SQLite in {data}, in-memory region \"{REGION}\")
  gRPC     {grpc}   Enforcement, Admin, Coordination, Envoy rate limit, health, reflection
  console  http://{http}/console   (sign in with the API key below)
  metrics  http://{http}/metrics
  stripe   http://{http}/webhooks/stripe   ({stripe})
  API key  {key}
           ({origin}; it has every scope)
  keys     {extra_keys}

Try it (grpcurl):
  K='authorization: Bearer {key}'
  grpcurl -plaintext -H \"$K\" -d '{{\"idempotency_key\":\"a1\",\"account_id\":\"acme\"}}' {grpc} tollgate.v1.Admin/CreateAccount
  grpcurl -plaintext -H \"$K\" -d '{{\"idempotency_key\":\"g1\",\"account_id\":\"acme\",\"grant_id\":\"welcome\",\"amount\":\"100\",\"source\":\"GRANT_SOURCE_PROMO\"}}' {grpc} tollgate.v1.Admin/IssueGrant
  grpcurl -plaintext -H \"$K\" -d '{{\"idempotency_key\":\"p1\",\"version\":{{\"version\":1,\"effective_from\":\"2020-01-01T00:00:00Z\",\"default_rates\":{{\"rates\":{{\"chat\":\"0.5\"}}}}}}}}' {grpc} tollgate.v1.Admin/PublishPriceBookVersion
  grpcurl -plaintext -H \"$K\" -d '{{\"idempotency_key\":\"d1\",\"account_id\":\"acme\",\"usage\":{{\"feature\":\"chat\",\"quantity\":\"3\"}}}}' {grpc} tollgate.v1.Enforcement/Debit
  grpcurl -plaintext -H \"$K\" -d '{{\"account_id\":\"acme\"}}' {grpc} tollgate.v1.Admin/GetBalance
",
        data = data.display()
    );
}
