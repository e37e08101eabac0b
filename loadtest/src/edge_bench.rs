//! `edge-bench`: the edge's hot path measured over gRPC from another process, next to a gRPC
//! health check on the same server (the transport's floor) in the same run.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use hdrhistogram::Histogram;
use tokio_stream::StreamExt;
use tollgate_core::{AccountId, Credits, FeatureKey, PriceBook, PriceBookVersion, Rate, Timestamp};
use tollgate_proto::pb;
use tollgate_region::{
    AccountSummary, EnforcementMode, RedisRegionStore, RegionStore, SegmentSpec, RETAIN_MS_DEFAULT,
};
use tollgate_testkit::RedisServer;
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;

use crate::{scenario, Figures, LATENCY_US_MAX};

pub(crate) const API_KEY: &str = "bench-enforce-key";
/// HTTP/2 connections the clients share.
pub(crate) const CHANNELS: usize = 8;
/// Accounts seeded concurrently.
const SEED_PARALLEL: usize = 256;
/// Requests one stream keeps in flight.
const STREAM_WINDOW: usize = 128;

pub struct EdgeBench {
    pub clients: usize,
    pub seconds: u64,
    pub accounts: usize,
    pub streams: usize,
    pub edge_binary: Option<PathBuf>,
}

/// A process this run started (an edge, an authority); ended by its own process id.
pub(crate) struct OwnedProcess(pub(crate) Child);

impl Drop for OwnedProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub(crate) fn edge_binary(given: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    binary_beside(
        "tollgate-edge",
        "tollgate-edge-node",
        "--edge-binary",
        given,
    )
}

/// `given`, or the program `name` (of package `package`) beside this one.
pub(crate) fn binary_beside(
    name: &str,
    package: &str,
    flag: &str,
    given: Option<PathBuf>,
) -> anyhow::Result<PathBuf> {
    if let Some(path) = given {
        return Ok(path);
    }
    let here = std::env::current_exe()?;
    let beside = here.with_file_name(name);
    if beside.exists() {
        return Ok(beside);
    }
    bail!(
        "{name} not found beside {}; build it (cargo build --release -p {package}) or pass {flag}",
        here.display()
    )
}

pub(crate) fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

pub(crate) async fn seed(store: &RedisRegionStore, accounts: usize) -> anyhow::Result<()> {
    let feature = FeatureKey::new("gen")?;
    let book = PriceBook::new(vec![PriceBookVersion {
        version: 1,
        effective_from: Timestamp::EPOCH,
        default: [(feature, Rate::parse("0.001")?)].into(),
        ..PriceBookVersion::default()
    }]);
    store.publish_price_book(&book).await?;
    let started = Instant::now();
    let mut index = 0;
    while index < accounts {
        let batch = (index..(index + SEED_PARALLEL).min(accounts)).map(|n| async move {
            let account = AccountId::new(format!("bench-{n}"))?;
            let segment = SegmentSpec {
                grant_id: tollgate_core::GrantId::new("g1")?,
                amount: Credits::from_whole(1_000_000)?,
                priority: 50,
                effective_at: Timestamp::EPOCH,
                expires_at: None,
                scope: tollgate_core::Scope::All,
            };
            let key = tollgate_core::IdempotencyKey::new(format!("seed-{n}"))?;
            store
                .install_segment(&account, &key, &segment, Timestamp::EPOCH)
                .await?;
            store
                .publish_account(&AccountSummary {
                    account,
                    created_at: Timestamp::EPOCH,
                    plan: None,
                    mode: EnforcementMode::Strict,
                    contracts: Vec::new(),
                    balance: segment.amount,
                    overdraft_limit: Credits::ZERO,
                    rate_limited: Default::default(),
                    published_at: Timestamp::EPOCH,
                    outside: Vec::new(),
                    debt_basis: Credits::ZERO,
                    region_moves: 0,
                })
                .await?;
            anyhow::Ok(())
        });
        for result in futures_util::future::join_all(batch).await {
            result?;
        }
        index += SEED_PARALLEL;
    }
    eprintln!(
        "  seeded {accounts} accounts in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// The edge's own view after a scenario: its lease manager's figures from `/metrics`.
async fn edge_figures(http: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut stream) = tokio::net::TcpStream::connect(http).await else {
        return "metrics unavailable".into();
    };
    let request = format!("GET /metrics HTTP/1.1\r\nHost: {http}\r\nConnection: close\r\n\r\n");
    if stream.write_all(request.as_bytes()).await.is_err() {
        return "metrics unavailable".into();
    }
    let mut text = String::new();
    let _ = stream.read_to_string(&mut text).await;
    let wanted = [
        "pending_decisions",
        "lease_flushes_total",
        "lease_refills_total",
        "lease_duplicates_total",
        "lease_lost_entries_total",
        "flush_lag_ms",
    ];
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let name = line.strip_prefix("tollgate_edge_")?;
            wanted
                .iter()
                .any(|w| name.starts_with(w))
                .then(|| name.replace(' ', "="))
        })
        .collect::<Vec<_>>()
        .join(" ")
}

pub(crate) async fn start_edge(
    binary: &PathBuf,
    redis_url: &str,
) -> anyhow::Result<(OwnedProcess, SocketAddr, String)> {
    start_edge_with(binary, redis_url, &[]).await
}

/// [`start_edge`] with more `TOLLGATE_*` variables (the authority's address and key).
pub(crate) async fn start_edge_with(
    binary: &PathBuf,
    redis_url: &str,
    more_env: &[(&str, &str)],
) -> anyhow::Result<(OwnedProcess, SocketAddr, String)> {
    let listen: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
    let http = format!("127.0.0.1:{}", free_port()?);
    let child = Command::new(binary)
        .envs(more_env.iter().copied())
        .env("TOLLGATE_REGION", "bench")
        .env("TOLLGATE_REDIS_URL", redis_url)
        .env("TOLLGATE_KEY_PREFIX", "tg:bench")
        .env("TOLLGATE_LISTEN", listen.to_string())
        .env("TOLLGATE_HTTP_LISTEN", &http)
        .env("TOLLGATE_ENFORCE_API_KEY", API_KEY)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {}", binary.display()))?;
    let edge = OwnedProcess(child);
    wait_healthy("the edge", listen).await?;
    Ok((edge, listen, http))
}

/// Waits (at most 15 s) until the gRPC server on `listen` answers a health check.
pub(crate) async fn wait_healthy(what: &str, listen: SocketAddr) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline {
        if let Ok(channel) = Channel::from_shared(format!("http://{listen}"))?
            .connect()
            .await
        {
            let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
            if health
                .check(tonic_health::pb::HealthCheckRequest::default())
                .await
                .is_ok()
            {
                return Ok(());
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("{what} did not answer health checks on {listen}")
}

pub(crate) type Client = pb::enforcement_client::EnforcementClient<Channel>;

pub(crate) fn authorized<T>(message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    // A constant, valid header value.
    if let Ok(value) = MetadataValue::try_from(format!("Bearer {API_KEY}")) {
        request.metadata_mut().insert("authorization", value);
    }
    request
}

pub(crate) fn debit_request(
    accounts: usize,
    client: usize,
    sequence: u64,
    mode: pb::EnforcementMode,
) -> pb::DebitRequest {
    let account =
        (client.wrapping_mul(7_919) + sequence as usize).wrapping_mul(2_654_435_761) % accounts;
    pb::DebitRequest {
        idempotency_key: format!("k{client}.{sequence}.{}", mode as i32),
        account_id: format!("bench-{account}"),
        usage: Some(pb::Usage {
            feature: "gen".into(),
            amount: Some(pb::usage::Amount::Quantity("1".into())),
        }),
        mode: mode as i32,
        ..pb::DebitRequest::default()
    }
}

async fn debit_once(client: &mut Client, request: pb::DebitRequest) -> anyhow::Result<()> {
    match client
        .debit(authorized(request))
        .await?
        .into_inner()
        .outcome
    {
        Some(pb::debit_reply::Outcome::Debited(_)) => Ok(()),
        other => bail!("not debited: {other:?}"),
    }
}

async fn debit_scenario(
    name: &'static str,
    channels: &[Channel],
    clients: usize,
    seconds: u64,
    accounts: usize,
    mode: pb::EnforcementMode,
) -> anyhow::Result<Figures> {
    let channels = channels.to_vec();
    scenario(name, clients, seconds, move |client, sequence| {
        let mut stub = Client::new(channels[client % channels.len()].clone());
        async move { debit_once(&mut stub, debit_request(accounts, client, sequence, mode)).await }
    })
    .await
}

/// `streams` Enforce streams, each keeping `STREAM_WINDOW` debits in flight.
async fn stream_scenario(
    channels: &[Channel],
    streams: usize,
    seconds: u64,
    accounts: usize,
) -> anyhow::Result<Figures> {
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for stream_index in 0..streams {
        let mut client = Client::new(channels[stream_index % channels.len()].clone());
        tasks.push(tokio::spawn(async move {
            let (sender, receiver) =
                tokio::sync::mpsc::channel::<pb::EnforceRequest>(STREAM_WINDOW * 2);
            let outbound = tokio_stream::wrappers::ReceiverStream::new(receiver);
            let mut replies = client.enforce(authorized(outbound)).await?.into_inner();
            let mut latency_us = Histogram::<u64>::new_with_bounds(1, LATENCY_US_MAX, 3)?;
            let sent_at: Arc<std::sync::Mutex<std::collections::HashMap<u64, Instant>>> =
                Arc::default();
            let (mut ops, mut errors, mut next) = (0_u64, 0_u64, 0_u64);
            let send = |id: u64| {
                let request = debit_request(
                    accounts,
                    10_000 + stream_index,
                    id,
                    pb::EnforcementMode::Cached,
                );
                pb::EnforceRequest {
                    correlation_id: id,
                    request: Some(pb::enforce_request::Request::Debit(request)),
                }
            };
            for _ in 0..STREAM_WINDOW {
                sent_at
                    .lock()
                    .map_err(|_| anyhow::anyhow!("lock"))?
                    .insert(next, Instant::now());
                sender.send(send(next)).await?;
                next += 1;
            }
            while let Some(reply) = replies.next().await {
                let reply = reply?;
                if let Some(at) = sent_at
                    .lock()
                    .map_err(|_| anyhow::anyhow!("lock"))?
                    .remove(&reply.correlation_id)
                {
                    latency_us.saturating_record(at.elapsed().as_micros() as u64);
                }
                match reply.reply {
                    Some(pb::enforce_reply::Reply::Debit(pb::DebitReply {
                        outcome: Some(pb::debit_reply::Outcome::Debited(_)),
                    })) => ops += 1,
                    _ => errors += 1,
                }
                if Instant::now() >= deadline {
                    if sent_at
                        .lock()
                        .map_err(|_| anyhow::anyhow!("lock"))?
                        .is_empty()
                    {
                        break;
                    }
                    continue;
                }
                sent_at
                    .lock()
                    .map_err(|_| anyhow::anyhow!("lock"))?
                    .insert(next, Instant::now());
                sender.send(send(next)).await?;
                next += 1;
            }
            drop(sender);
            anyhow::Ok((latency_us, ops, errors))
        }));
    }
    let mut figures = Figures::new("Enforce stream, cached", Duration::ZERO)?;
    for task in tasks {
        let (latency_us, ops, errors) = task.await??;
        figures.latency_us.add(&latency_us)?;
        figures.ops += ops;
        figures.errors += errors;
    }
    figures.elapsed = started.elapsed();
    eprintln!(
        "  {}: {} ops in {:.1} s",
        figures.name,
        figures.ops,
        figures.elapsed.as_secs_f64()
    );
    Ok(figures)
}

/// Open loop at `rate` per second: requests leave on schedule whether or not earlier ones have
/// answered, and latency counts from the scheduled time, so slow answers are not hidden.
async fn fixed_rate_scenario(
    name: &'static str,
    channels: &[Channel],
    rate: f64,
    seconds: u64,
    accounts: usize,
) -> anyhow::Result<Figures> {
    let interval = Duration::from_secs_f64(1.0 / rate.max(1.0));
    let started = Instant::now();
    let deadline = started + Duration::from_secs(seconds);
    let (done, mut results) = tokio::sync::mpsc::unbounded_channel::<(Duration, bool)>();
    let mut sequence = 0_u64;
    while Instant::now() < deadline {
        let scheduled = started + interval.mul_f64(sequence as f64);
        tokio::time::sleep_until(scheduled.into()).await;
        let mut stub = Client::new(channels[sequence as usize % channels.len()].clone());
        let request = debit_request(accounts, 20_000, sequence, pb::EnforcementMode::Cached);
        let done = done.clone();
        tokio::spawn(async move {
            let ok = debit_once(&mut stub, request).await.is_ok();
            let _ = done.send((scheduled.elapsed(), ok));
        });
        sequence += 1;
    }
    drop(done);
    let mut figures = Figures::new(name, Duration::ZERO)?;
    while let Some((took, ok)) = results.recv().await {
        figures
            .latency_us
            .saturating_record(took.as_micros() as u64);
        if ok {
            figures.ops += 1;
        } else {
            figures.errors += 1;
        }
    }
    figures.elapsed = started.elapsed();
    eprintln!(
        "  {name}: {} ops in {:.1} s",
        figures.ops,
        figures.elapsed.as_secs_f64()
    );
    Ok(figures)
}

pub async fn run(bench: EdgeBench) -> anyhow::Result<()> {
    let binary = edge_binary(bench.edge_binary)?;
    let redis = RedisServer::start().context("start a redis-server for the benchmark")?;
    eprintln!(
        "edge-bench: {} clients, {} s per scenario, 1 and {} accounts, {} streams; redis {}",
        bench.clients,
        bench.seconds,
        bench.accounts,
        bench.streams,
        redis.url()
    );
    let store = RedisRegionStore::connect(&redis.url(), "tg:bench", RETAIN_MS_DEFAULT).await?;
    seed(&store, bench.accounts.max(1)).await?;
    let (_edge, address, http) = start_edge(&binary, &redis.url()).await?;
    let mut channels = Vec::with_capacity(CHANNELS);
    for _ in 0..CHANNELS {
        channels.push(
            Channel::from_shared(format!("http://{address}"))?
                .tcp_nodelay(true)
                .connect()
                .await?,
        );
    }

    let health_channels = channels.clone();
    let baseline = scenario(
        "gRPC health check (baseline)",
        bench.clients,
        bench.seconds,
        move |client, _| {
            let mut health = tonic_health::pb::health_client::HealthClient::new(
                health_channels[client % health_channels.len()].clone(),
            );
            async move {
                health
                    .check(tonic_health::pb::HealthCheckRequest::default())
                    .await?;
                Ok(())
            }
        },
    )
    .await?;
    let (c, s) = (bench.clients, bench.seconds);
    let cached_one = debit_scenario(
        "Debit cached, 1 account",
        &channels,
        c,
        s,
        1,
        pb::EnforcementMode::Cached,
    )
    .await?;
    let strict_one = debit_scenario(
        "Debit strict, 1 account",
        &channels,
        c,
        s,
        1,
        pb::EnforcementMode::Strict,
    )
    .await?;
    let cached_many = debit_scenario(
        "Debit cached, many accounts",
        &channels,
        c,
        s,
        bench.accounts,
        pb::EnforcementMode::Cached,
    )
    .await?;
    let strict_many = debit_scenario(
        "Debit strict, many accounts",
        &channels,
        c,
        s,
        bench.accounts,
        pb::EnforcementMode::Strict,
    )
    .await?;
    let stream = stream_scenario(&channels, bench.streams, s, 1).await?;
    eprintln!("    edge: {}", edge_figures(&http).await);
    let half = fixed_rate_scenario(
        "Debit cached at half load",
        &channels,
        cached_one.ops_per_s() / 2.0,
        s,
        1,
    )
    .await?;

    crate::print_header();
    for figures in [
        &baseline,
        &cached_one,
        &strict_one,
        &cached_many,
        &strict_many,
        &stream,
        &half,
    ] {
        figures.print_row(baseline.ops_per_s());
    }
    println!();
    println!(
        "strict / cached throughput: {:.2} (1 account), {:.2} (many accounts)",
        strict_one.ops_per_s() / cached_one.ops_per_s().max(1e-9),
        strict_many.ops_per_s() / cached_many.ops_per_s().max(1e-9)
    );
    Ok(())
}
