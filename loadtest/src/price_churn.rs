//! `price-churn`: the edge under sustained debits while a new price book version is published
//! every second, next to the same load with the prices left alone, in one run.
//!
//! Version `v` prices `gen` at `0.001 × v` credits per unit and every debit is of one unit, so
//! a decision's cost names the version it was priced with. Each reply's cost is checked
//! against the rate of the version the reply names: a decision priced with a mix of versions
//! (the rate of one, the number of another, or half a book) fails the check and the run.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use tollgate_core::{Credits, FeatureKey, PriceBook, PriceBookVersion, Rate, Timestamp};
use tollgate_proto::pb;
use tollgate_region::{RedisRegionStore, RegionStore, RETAIN_MS_DEFAULT};
use tollgate_testkit::RedisServer;
use tonic::transport::Channel;

use crate::edge_bench::{authorized, debit_request, edge_binary, seed, start_edge, Client};
use crate::{scenario, Figures};

/// Versions the run can publish (one a second, so this bounds a run's length too).
const VERSIONS_MAX: u64 = 1_000;
/// Micro-credits per unit at version 1 (0.001 credits).
const MICROS_PER_VERSION: i64 = 1_000;

pub struct PriceChurn {
    pub clients: usize,
    pub seconds: u64,
    pub accounts: usize,
    pub interval_ms: u64,
    pub edge_binary: Option<std::path::PathBuf>,
}

/// The whole book as it stands once `latest` is published: versions 1..=latest, all in effect
/// (the newest wins).
fn book(latest: u64) -> anyhow::Result<PriceBook> {
    let feature = FeatureKey::new("gen")?;
    let versions = (1..=latest)
        .map(|v| {
            let micros = MICROS_PER_VERSION * i64::try_from(v)?;
            Ok(PriceBookVersion {
                version: v,
                effective_from: Timestamp::EPOCH,
                default: [(
                    feature.clone(),
                    Rate::from_credits(Credits::from_micros(micros))?,
                )]
                .into(),
                ..PriceBookVersion::default()
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok(PriceBook::new(versions))
}

/// What the checked scenarios saw: decisions per version, and any priced with a mix.
#[derive(Default)]
struct Seen {
    by_version: Vec<AtomicU64>,
    mixed: AtomicU64,
    first_mixed: std::sync::Mutex<Option<String>>,
}

impl Seen {
    fn new() -> Arc<Seen> {
        Arc::new(Seen {
            by_version: (0..=VERSIONS_MAX).map(|_| AtomicU64::new(0)).collect(),
            ..Seen::default()
        })
    }

    fn versions(&self) -> Vec<(u64, u64)> {
        self.by_version
            .iter()
            .enumerate()
            .filter_map(|(v, n)| {
                let n = n.load(Ordering::Relaxed);
                (n > 0).then_some((v as u64, n))
            })
            .collect()
    }
}

/// One debit; its reply's cost must be the named version's rate.
async fn checked_debit(
    client: &mut Client,
    request: pb::DebitRequest,
    seen: &Seen,
) -> anyhow::Result<()> {
    let reply = client.debit(authorized(request)).await?.into_inner();
    let Some(pb::debit_reply::Outcome::Debited(debited)) = reply.outcome else {
        bail!("not debited: {:?}", reply.outcome);
    };
    let priced = debited.priced.context("a debit without its price")?;
    let cost = Credits::parse(&priced.cost)?;
    let version = priced.price_version;
    let expected = i64::try_from(version)
        .ok()
        .and_then(|v| v.checked_mul(MICROS_PER_VERSION));
    if version == 0 || version > VERSIONS_MAX || expected != Some(cost.micros()) {
        seen.mixed.fetch_add(1, Ordering::Relaxed);
        let mut first = seen
            .first_mixed
            .lock()
            .map_err(|_| anyhow::anyhow!("lock"))?;
        first.get_or_insert_with(|| format!("version {version} priced at {cost}"));
        bail!("priced with a mix of versions: version {version}, cost {cost}");
    }
    seen.by_version[version as usize].fetch_add(1, Ordering::Relaxed);
    Ok(())
}

async fn checked_scenario(
    name: &'static str,
    tag: &'static str,
    channels: &[Channel],
    bench: &PriceChurn,
    mode: pb::EnforcementMode,
    seen: Arc<Seen>,
) -> anyhow::Result<Figures> {
    let channels = channels.to_vec();
    let accounts = bench.accounts;
    scenario(
        name,
        bench.clients,
        bench.seconds,
        move |client, sequence| {
            let mut stub = Client::new(channels[client % channels.len()].clone());
            let seen = Arc::clone(&seen);
            // Distinct keys per scenario: the mode and the scenario's tag enter the key.
            let mut request = debit_request(accounts, client, sequence, mode);
            request.idempotency_key = format!("{tag}.{}", request.idempotency_key);
            async move { checked_debit(&mut stub, request, &seen).await }
        },
    )
    .await
}

/// Publishes version 2, 3, … every `interval` until `stop`; returns the last one published.
async fn publish_every(
    store: Arc<RedisRegionStore>,
    first: u64,
    interval: Duration,
    stop: Instant,
) -> anyhow::Result<u64> {
    let mut latest = first - 1;
    let mut next_at = Instant::now();
    while Instant::now() < stop && latest < VERSIONS_MAX {
        latest += 1;
        store.publish_price_book(&book(latest)?).await?;
        next_at += interval;
        tokio::time::sleep_until(next_at.into()).await;
    }
    Ok(latest)
}

pub async fn run(bench: PriceChurn) -> anyhow::Result<()> {
    let binary = edge_binary(bench.edge_binary.clone())?;
    let redis = RedisServer::start().context("start a redis-server for the run")?;
    eprintln!(
        "price-churn: {} clients, {} s per scenario, {} accounts, a version every {} ms; redis {}",
        bench.clients,
        bench.seconds,
        bench.accounts,
        bench.interval_ms,
        redis.url()
    );
    let store =
        Arc::new(RedisRegionStore::connect(&redis.url(), "tg:bench", RETAIN_MS_DEFAULT).await?);
    seed(&store, bench.accounts).await?;
    let (_edge, address, _http) = start_edge(&binary, &redis.url()).await?;
    let mut channels = Vec::new();
    for _ in 0..crate::edge_bench::CHANNELS {
        channels.push(
            Channel::from_shared(format!("http://{address}"))?
                .tcp_nodelay(true)
                .connect()
                .await?,
        );
    }

    let mut rows = Vec::new();
    let mut published = 1;
    let mut all_seen = Vec::new();
    for (mode, label) in [
        (pb::EnforcementMode::Cached, "cached"),
        (pb::EnforcementMode::Strict, "strict"),
    ] {
        let steady_seen = Seen::new();
        let (steady_name, churn_name): (&'static str, &'static str) = match label {
            "cached" => (
                "cached, prices unchanged",
                "cached, a new version each interval",
            ),
            _ => (
                "strict, prices unchanged",
                "strict, a new version each interval",
            ),
        };
        let steady = checked_scenario(
            steady_name,
            "steady",
            &channels,
            &bench,
            mode,
            steady_seen.clone(),
        )
        .await?;
        let churn_seen = Seen::new();
        let stop = Instant::now() + Duration::from_secs(bench.seconds);
        let publisher = tokio::spawn(publish_every(
            Arc::clone(&store),
            published + 1,
            Duration::from_millis(bench.interval_ms),
            stop,
        ));
        let churn = checked_scenario(
            churn_name,
            "churn",
            &channels,
            &bench,
            mode,
            churn_seen.clone(),
        )
        .await?;
        published = publisher.await??;
        all_seen.push((steady_name, steady_seen));
        all_seen.push((churn_name, churn_seen));
        rows.push((steady, churn));
    }

    crate::print_header();
    for (steady, churn) in &rows {
        steady.print_row(steady.ops_per_s());
        churn.print_row(steady.ops_per_s());
    }
    println!();
    let mut mixed_total = 0;
    for (name, seen) in &all_seen {
        let versions = seen.versions();
        let mixed = seen.mixed.load(Ordering::Relaxed);
        mixed_total += mixed;
        let span = match (versions.first(), versions.last()) {
            (Some(first), Some(last)) => format!("versions {}..={}", first.0, last.0),
            _ => "no decisions".to_owned(),
        };
        println!(
            "{name:<40} {span:<20} {} versions seen, {mixed} priced with a mix",
            versions.len()
        );
        if let Ok(first) = seen.first_mixed.lock() {
            if let Some(first) = first.as_ref() {
                println!("  first: {first}");
            }
        }
    }
    for (steady, churn) in &rows {
        println!(
            "throughput with a version each interval / without: {:.3} ({})",
            churn.ops_per_s() / steady.ops_per_s().max(1e-9),
            steady.name
        );
    }
    println!("versions published: {published}");
    if mixed_total > 0 {
        bail!("{mixed_total} decisions were priced with a mix of versions");
    }
    if let Some((steady, _)) = rows
        .iter()
        .find(|(steady, churn)| steady.ops == 0 || churn.ops == 0)
    {
        bail!(
            "{}: no decision was made, so nothing was checked",
            steady.name
        );
    }
    Ok(())
}
