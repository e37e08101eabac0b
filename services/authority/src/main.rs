//! `tollgate-authority`: config → ledger → gRPC server.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tollgate_authority_service::admin::SystemClock;
use tollgate_authority_service::auth::{key_digest, Scope};
use tollgate_authority_service::config::RawConfig;

#[derive(Parser)]
#[command(
    name = "tollgate-authority",
    about = "Tollgate's authority node",
    version
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the Admin gRPC service (plus health and reflection).
    Serve {
        /// TOML configuration; without one, the embedded default (SQLite in ./tollgate-data).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Listen address, overriding the file.
        #[arg(long, env = "TOLLGATE_LISTEN")]
        listen: Option<String>,
        /// postgres://… or sqlite://path, overriding the file.
        #[arg(long, env = "TOLLGATE_DATABASE_URL")]
        database_url: Option<String>,
        #[command(flatten)]
        tls: TlsFlags,
    },
    /// Run the embedded single node: authority and one edge in this process, on SQLite and
    /// the in-memory regional store, with nothing else to install.
    Dev {
        /// gRPC listen address (Enforcement, Admin, Coordination, Envoy, health, reflection).
        #[arg(long, default_value = tollgate_authority_service::dev::LISTEN_DEFAULT)]
        listen: std::net::SocketAddr,
        /// HTTP listen address for /metrics and POST /webhooks/stripe.
        #[arg(long, default_value = tollgate_authority_service::dev::HTTP_LISTEN_DEFAULT)]
        http_listen: std::net::SocketAddr,
        /// Directory of the SQLite files (created if missing).
        #[arg(long, default_value = tollgate_authority_service::dev::DATA_DEFAULT)]
        data: PathBuf,
        /// More keys, each with its own scopes: a TOML file of `[[api_keys]]` entries (name,
        /// sha256, scope), as in the `serve` configuration. TOLLGATE_DEV_EXTRA_KEYS adds keys
        /// in clear: `name:scope[+scope]:secret,…`.
        #[arg(long)]
        keys: Option<PathBuf>,
        #[command(flatten)]
        tls: TlsFlags,
    },
    /// Print the sha256 of an API key (read from standard input), for the config file.
    HashKey,
}

/// TLS on the gRPC listener; for `serve`, the flags replace the file's `[tls]`.
#[derive(clap::Args)]
struct TlsFlags {
    /// The listener's certificate chain (PEM); with --tls-key, the listener speaks TLS.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Clients must present a certificate signed by this CA (PEM): mutual TLS.
    #[arg(long, requires = "tls_cert")]
    tls_client_ca: Option<PathBuf>,
}

impl TlsFlags {
    fn load(self) -> anyhow::Result<Option<tonic::transport::ServerTlsConfig>> {
        let (Some(cert), Some(key)) = (self.tls_cert, self.tls_key) else {
            return Ok(None);
        };
        let files = tollgate_serve::tls::ServerTlsFiles {
            cert,
            key,
            client_ca: self.tls_client_ca,
        };
        Ok(Some(files.load("--tls")?))
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    match Cli::parse().command {
        Command::HashKey => {
            let mut key = String::new();
            std::io::stdin()
                .read_line(&mut key)
                .context("reading the key")?;
            println!(
                "{}",
                hex::encode(key_digest(key.trim_end_matches(['\r', '\n'])))
            );
            Ok(())
        }
        Command::Serve {
            config,
            listen,
            database_url,
            tls,
        } => serve(config, listen, database_url, tls).await,
        Command::Dev {
            listen,
            http_listen,
            data,
            keys,
            tls,
        } => {
            let tls = tls.load()?;
            let options = tollgate_authority_service::dev::DevOptions {
                listen,
                http_listen,
                data,
                api_key: std::env::var("TOLLGATE_DEV_API_KEY")
                    .ok()
                    .filter(|key| !key.is_empty()),
                stripe_webhook_secret: std::env::var(
                    tollgate_authority_service::purchases::STRIPE_SECRET_ENV_DEV,
                )
                .ok()
                .filter(|secret| !secret.is_empty()),
            };
            // A key with the read scope only, to try the console as support staff see it.
            let mut extra_keys: Vec<_> = std::env::var("TOLLGATE_DEV_READ_API_KEY")
                .ok()
                .filter(|key| !key.is_empty())
                .map(|key| tollgate_authority_service::auth::KeyEntry {
                    name: "dev-read".to_owned(),
                    digest: key_digest(&key),
                    scope: Scope::Read,
                })
                .into_iter()
                .collect();
            extra_keys.extend(dev_extra_keys(keys.as_deref())?);
            tollgate_authority_service::dev::run_with(
                options,
                tls,
                extra_keys,
                tollgate_serve::shutdown_signal(),
            )
            .await
        }
    }
}

/// The embedded node's keys besides its development key: `TOLLGATE_DEV_EXTRA_KEYS` (in
/// clear) and the `--keys` file (digests).
fn dev_extra_keys(
    file: Option<&std::path::Path>,
) -> anyhow::Result<Vec<tollgate_authority_service::auth::KeyEntry>> {
    use tollgate_authority_service::dev_keys;
    let mut keys = match std::env::var(dev_keys::EXTRA_KEYS_ENV) {
        Ok(text) if !text.trim().is_empty() => dev_keys::parse_extra_keys(&text)?,
        Ok(_) | Err(std::env::VarError::NotPresent) => Vec::new(),
        Err(std::env::VarError::NotUnicode(_)) => {
            anyhow::bail!("{}: not valid UTF-8", dev_keys::EXTRA_KEYS_ENV)
        }
    };
    if let Some(file) = file {
        keys.extend(dev_keys::load_keys_file(file)?);
    }
    Ok(keys)
}

async fn serve(
    config: Option<PathBuf>,
    listen: Option<String>,
    database_url: Option<String>,
    tls: TlsFlags,
) -> anyhow::Result<()> {
    let flag_tls = tls.load()?;
    let mut clear_keys = Vec::new();
    if let Ok(key) = std::env::var("TOLLGATE_ADMIN_API_KEY") {
        clear_keys.push(("TOLLGATE_ADMIN_API_KEY", key, Scope::Admin));
    }
    if let Ok(key) = std::env::var("TOLLGATE_READ_API_KEY") {
        clear_keys.push(("TOLLGATE_READ_API_KEY", key, Scope::Read));
    }
    let mut config =
        RawConfig::load(config.as_deref())?.validate(listen, database_url, &clear_keys)?;
    if flag_tls.is_some() {
        config.tls = flag_tls;
    }
    let tls = config.tls.take();
    let store = tollgate_authority_service::open_ledger(&config.database_url)
        .await
        .context("opening the ledger")?;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("binding {}", config.listen))?;
    tracing::info!(listen = %listener.local_addr()?, "authority serving");
    let (changes, changed) =
        tokio::sync::mpsc::channel(tollgate_authority_service::admin::CHANGES_CHANNEL_CAPACITY);
    let keys = Arc::new(config.keys.clone());
    let authority = authority(&config, &store).await?;
    let (http_stop, http_stopped) = tokio::sync::watch::channel(false);
    let http = match config.http_listen {
        Some(address) => {
            let lifecycle = authority
                .clone()
                .map(|a| a as Arc<dyn tollgate_authority_service::lifecycle::Lifecycle>);
            let console = (Arc::clone(&keys), lifecycle);
            let state = match &authority {
                Some(authority) => authority.state().clone(),
                None => tollgate_authority::StateStore::connect(&config.state_url)
                    .await
                    .context("opening the authority's state")?,
            };
            // /metrics reads its gauges at scrape time: parked usage from the authority's
            // state, and with regions the authority's own (streams, allocations, outbox).
            let metrics = match &authority {
                Some(authority) => tollgate_authority_service::metrics::router(
                    Arc::clone(authority),
                    Arc::new(String::new),
                ),
                None => tollgate_authority_service::parked::metrics_router(
                    state.clone(),
                    Arc::new(String::new),
                ),
            };
            Some(
                serve_http(
                    address,
                    &config,
                    &store,
                    changes.clone(),
                    console,
                    (state, metrics),
                    http_stopped,
                )
                .await?,
            )
        }
        None => None,
    };
    let shutdown = async move {
        tollgate_serve::shutdown_signal().await;
        tracing::info!("shutting down");
        let _ = http_stop.send(true);
    };
    let Some(authority) = authority else {
        tracing::warn!("no [[regions]] configured: serving Admin over the ledger only");
        // The audit table lives in the authority's state even when nothing else does.
        let state = tollgate_authority::StateStore::connect(&config.state_url)
            .await
            .context("opening the authority's state")?;
        tollgate_authority_service::server::serve(
            listener,
            store,
            state,
            keys,
            Arc::new(SystemClock),
            tls,
            shutdown,
        )
        .await?;
        return stop_http(http).await;
    };
    tracing::info!(
        regions = config.regions.len(),
        "reconciling, allocating and running the lifecycle"
    );
    tollgate_authority_service::server::serve_authority_with_changes(
        listener,
        store,
        keys,
        authority,
        Arc::new(SystemClock),
        (changes, changed),
        tls,
        shutdown,
    )
    .await?;
    stop_http(http).await
}

type RegionAuthority = tollgate_authority::Authority<
    dyn tollgate_ledger::LedgerStore,
    tollgate_region::RedisRegionStore,
>;

/// The whole authority over the configured Redis regions; `None` without regions.
async fn authority(
    config: &tollgate_authority_service::config::Config,
    store: &Arc<dyn tollgate_ledger::LedgerStore>,
) -> anyhow::Result<Option<Arc<RegionAuthority>>> {
    if config.regions.is_empty() {
        return Ok(None);
    }
    let mut regions = std::collections::BTreeMap::new();
    for region in &config.regions {
        let redis = tollgate_region::RedisRegionStore::connect(
            &region.redis_url,
            &region.key_prefix,
            tollgate_region::RETAIN_MS_DEFAULT,
        )
        .await
        .with_context(|| {
            format!(
                "connecting to region {} at {}",
                region.name, region.redis_url
            )
        })?;
        regions.insert(region.name.clone(), Arc::new(redis));
    }
    let state = tollgate_authority::StateStore::connect(&config.state_url)
        .await
        .context("opening the authority's state")?;
    Ok(Some(Arc::new(tollgate_authority::Authority::new(
        Arc::clone(store),
        state,
        regions,
        Arc::new(SystemClock),
        tollgate_authority::AuthoritySettings {
            webhooks: config.webhooks.clone(),
            ..Default::default()
        },
    ))))
}

type HttpTask = tokio::task::JoinHandle<std::io::Result<()>>;

/// Signs the balance widget's tokens (at least 32 bytes), so they outlive a restart and every
/// authority process accepts them; unset: a random secret per process.
const WIDGET_SECRET_ENV: &str = "TOLLGATE_WIDGET_SECRET";

/// What the console needs besides the ledger: the keys people sign in with, and the
/// authority's lifecycle when it runs (prices, plans, reports).
type ConsoleParts = (
    Arc<tollgate_authority_service::auth::KeyRing>,
    Option<Arc<dyn tollgate_authority_service::lifecycle::Lifecycle>>,
);

/// The HTTP listener: `POST /webhooks/stripe` (503 without `[payments] stripe_secret_env`),
/// the admin console (`/console`), the balance widget (`/widget`) and `/metrics` (the
/// `metrics` router).
async fn serve_http(
    address: std::net::SocketAddr,
    config: &tollgate_authority_service::config::Config,
    store: &Arc<dyn tollgate_ledger::LedgerStore>,
    changes: tokio::sync::mpsc::Sender<tollgate_core::AccountId>,
    (keys, lifecycle): ConsoleParts,
    (state, metrics): (tollgate_authority::StateStore, axum::Router),
    mut stopped: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<HttpTask> {
    use tollgate_authority_service::purchases::{serve_http, StripeWebhook};
    let listener = tokio::net::TcpListener::bind(address)
        .await
        .with_context(|| format!("binding {address}"))?;
    tracing::info!(http_listen = %listener.local_addr()?, "serving POST /webhooks/stripe");
    let (secret, tolerance_s) = match &config.stripe {
        Some(stripe) => (Some(stripe.secret.clone()), stripe.tolerance_s),
        None => {
            tracing::warn!("no [payments] stripe_secret_env: stripe webhooks answer 503");
            (None, tollgate_authority::stripe::TOLERANCE_S_DEFAULT)
        }
    };
    let router = StripeWebhook::new(
        Arc::clone(store),
        Arc::new(SystemClock),
        secret,
        tolerance_s,
    )
    .with_changes(changes.clone())
    .router();
    let mut admin = tollgate_authority_service::admin::AdminService::new(
        Arc::clone(store),
        Arc::new(SystemClock),
    )
    .with_changes(changes)
    .with_audit(state.clone());
    if let Some(lifecycle) = &lifecycle {
        admin = admin.with_lifecycle(Arc::clone(lifecycle));
    }
    let regions = config.regions.iter().map(|r| r.name.clone()).collect();
    let mut console = tollgate_authority_service::console::Console::new(
        admin,
        Arc::clone(store),
        lifecycle,
        Arc::new(SystemClock),
        keys,
        regions,
    )
    .map_err(|e| anyhow::anyhow!("no randomness for the console: {e}"))?;
    if let Ok(secret) = std::env::var(WIDGET_SECRET_ENV) {
        console = console
            .with_widget_secret(secret.as_bytes())
            .map_err(|e| anyhow::anyhow!("{WIDGET_SECRET_ENV}: {e}"))?;
    }
    tracing::info!(console = %format!("http://{}/console", listener.local_addr()?), "serving the admin console");
    let router = router.merge(Arc::new(console).router()).merge(metrics);
    Ok(tokio::spawn(serve_http(listener, router, async move {
        let _ = stopped.wait_for(|stopped| *stopped).await;
    })))
}

async fn stop_http(http: Option<HttpTask>) -> anyhow::Result<()> {
    if let Some(task) = http {
        task.await.context("the HTTP listener panicked")??;
    }
    Ok(())
}
