//! `tollgate-edge`: config -> telemetry -> regional store -> engine -> serve.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use tollgate_edge::coordination::AuthorityClient;
use tollgate_edge::metrics::Metrics;
use tollgate_edge::server::{serve_grpc_with_tls, serve_metrics};
use tollgate_edge::{Engine, SystemClock};
use tollgate_edge_node::config::{Config, RawConfig};
use tollgate_region::{MemoryRegionStore, RedisRegionStore, RegionStore, RETAIN_MS_DEFAULT};
use tracing::info;

#[derive(Parser)]
#[command(
    name = "tollgate-edge",
    version,
    about = "A Tollgate edge node: answers enforcement calls for one region."
)]
#[command(
    after_help = "Examples:\n  tollgate-edge --config /etc/tollgate/edge.toml\n  TOLLGATE_REDIS_URL=redis://127.0.0.1:6379/ TOLLGATE_REGION=eu-west-1 tollgate-edge"
)]
struct Cli {
    /// The TOML configuration; without it the edge runs on an in-memory regional store.
    #[arg(long)]
    config: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let otlp = std::env::var(tollgate_telemetry::OTLP_ENDPOINT_ENV).ok();
    // Kept to the end of main: dropping it flushes the spans not exported yet.
    let _telemetry = tollgate_telemetry::init("tollgate-edge", otlp.as_deref())?;
    let cli = Cli::parse();
    let config =
        RawConfig::load(cli.config.as_deref(), |name| std::env::var(name).ok())?.validate()?;
    match config.redis_url.clone() {
        Some(url) => {
            let store = RedisRegionStore::connect(&url, &config.key_prefix, RETAIN_MS_DEFAULT)
                .await
                .with_context(|| format!("connecting to the regional Redis at {url}"))?;
            run(config, Arc::new(store)).await
        }
        None => {
            tracing::warn!("no redis_url: running on an in-memory regional store");
            run(config, Arc::new(MemoryRegionStore::default())).await
        }
    }
}

async fn run<S: RegionStore>(config: Config, store: Arc<S>) -> anyhow::Result<()> {
    let mut engine = Engine::new(store, config.settings.clone(), Arc::new(SystemClock));
    if let Some(url) = &config.authority_url {
        let node = engine.leases().lease_id().to_string();
        let client = AuthorityClient::with_tls(
            url,
            config.authority_tls.clone(),
            config.settings.region.clone(),
            config.authority_api_key.as_deref(),
            node,
        )?;
        engine = engine.with_allocator(Arc::new(client));
    }
    let engine = Arc::new(engine);
    let background = engine.start().await;
    let metrics = Arc::new(Metrics::new()?);
    let grpc = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("binding {}", config.listen))?;
    let http = tokio::net::TcpListener::bind(config.http_listen)
        .await
        .with_context(|| format!("binding {}", config.http_listen))?;
    info!(region = %config.settings.region, grpc = %config.listen, metrics = %config.http_listen, "edge serving");
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let metrics_task = tokio::spawn(serve_metrics(
        http,
        Arc::clone(&engine),
        Arc::clone(&metrics),
        wait(stopped.clone()),
    ));
    let shutdown = async move {
        tollgate_serve::shutdown_signal().await;
        info!("shutting down: draining calls in flight");
        let _ = stop.send(true);
    };
    serve_grpc_with_tls(
        grpc,
        config.tls.clone(),
        Arc::clone(&engine),
        metrics,
        Arc::new(config.keys),
        config.limits,
        shutdown,
    )
    .await?;
    metrics_task.await??;
    background.iter().for_each(|task| task.abort());
    info!("edge stopped");
    Ok(())
}

async fn wait(mut stopped: tokio::sync::watch::Receiver<bool>) {
    let _ = stopped.wait_for(|stopped| *stopped).await;
}
