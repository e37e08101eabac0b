//! `cold-path`: what a decision costs when the spend exceeds what the region holds for the
//! account, so the edge asks the authority (`RequestAllocation` over gRPC) within the request,
//! next to a warm decision (the region already holds enough), from the same client in the same
//! run. Starts its own redis-server, a `tollgate-authority serve` on SQLite with that Redis as
//! its one region, and a `tollgate-edge` whose cold path asks that authority.
//!
//! Warm and cold decisions alternate, one at a time (no queueing in the figures): a warm one on
//! an account the region already holds credits for, a cold one on an account seeded through
//! Admin that the region holds nothing of (checked in Redis before the call, outside the timed
//! part). Every decision is a strict Debit of 1 credit and must be allowed, so each cold one
//! did take the credits the authority brought in that request.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use tollgate_core::{AccountId, Timestamp};
use tollgate_proto::pb;
use tollgate_region::{RedisRegionStore, RegionStore, RETAIN_MS_DEFAULT};
use tollgate_testkit::RedisServer;
use tonic::transport::Channel;

use crate::drivers::{account_id, FEATURE};
use crate::edge_bench::{
    authorized, binary_beside, edge_binary, free_port, start_edge_with, wait_healthy, Client,
    OwnedProcess, API_KEY,
};
use crate::ledger::{wait_priced, AdminApi, Funding};
use crate::Figures;

/// The authority's key: Admin for seeding, Coordination for the edge's cold path.
const ADMIN_KEY: &str = "bench-admin-key";
/// The run's accounts: `cp-0` is the warm one, `cp-1` … the cold ones.
const RUN_ID: &str = "cp";
/// Each account's one grant, in credits; far more than a run spends.
const GRANT_CREDITS: i64 = 1_000_000;
/// The feature's price: 1 credit per call, so each decision costs 1 credit.
const PRICE_MICROS: i64 = 1_000_000;
/// Warm decisions made before timing (the warm account's own cold path, connections).
const WARM_UP_DECISIONS: u64 = 50;
/// Most cold decisions (accounts seeded) a run may ask for.
pub const DECISIONS_MAX: u64 = 100_000;

pub struct ColdPath {
    /// Cold decisions (and as many warm ones); one account seeded per cold decision.
    pub decisions: u64,
    /// The run stops after this many seconds even when decisions are left.
    pub seconds: u64,
    pub edge_binary: Option<PathBuf>,
    pub authority_binary: Option<PathBuf>,
}

/// A directory of this run's own, removed at the end.
struct RunDir(PathBuf);

impl Drop for RunDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `tollgate-authority serve` on a SQLite ledger in `dir`, with one region `bench` on
/// `redis_url`; its gRPC address.
async fn start_authority(
    binary: &PathBuf,
    dir: &RunDir,
    redis_url: &str,
) -> anyhow::Result<(OwnedProcess, SocketAddr)> {
    let config = dir.0.join("authority.toml");
    std::fs::write(
        &config,
        format!(
            "database_url = \"sqlite://{}\"\n[[regions]]\nname = \"bench\"\nredis_url = \"{redis_url}\"\nkey_prefix = \"tg:bench\"\n",
            dir.0.join("ledger.db").display()
        ),
    )?;
    let listen: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
    let child = Command::new(binary)
        .args(["serve", "--config"])
        .arg(&config)
        .env("TOLLGATE_LISTEN", listen.to_string())
        .env("TOLLGATE_ADMIN_API_KEY", ADMIN_KEY)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {}", binary.display()))?;
    let authority = OwnedProcess(child);
    wait_healthy("the authority", listen).await?;
    Ok((authority, listen))
}

fn now() -> Timestamp {
    let millis = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64);
    Timestamp::from_millis(millis).unwrap_or(Timestamp::EPOCH)
}

/// One strict Debit of 1 call on `account`, timed; an error unless it was allowed.
async fn decide(client: &mut Client, account: &str, key: String) -> anyhow::Result<Duration> {
    let request = pb::DebitRequest {
        idempotency_key: key,
        account_id: account.into(),
        usage: Some(pb::Usage {
            feature: FEATURE.into(),
            amount: Some(pb::usage::Amount::Quantity("1".into())),
        }),
        mode: pb::EnforcementMode::Strict.into(),
        ..pb::DebitRequest::default()
    };
    let began = Instant::now();
    let reply = client.debit(authorized(request)).await;
    let took = began.elapsed();
    match reply?.into_inner().outcome {
        Some(pb::debit_reply::Outcome::Debited(_)) => Ok(took),
        other => bail!("{account}: not debited: {other:?}"),
    }
}

pub async fn run(bench: ColdPath) -> anyhow::Result<()> {
    let edge = edge_binary(bench.edge_binary)?;
    let authority = binary_beside(
        "tollgate-authority",
        "tollgate-authority-service",
        "--authority-binary",
        bench.authority_binary,
    )?;
    let redis = RedisServer::start().context("start a redis-server for the benchmark")?;
    let dir =
        RunDir(std::env::temp_dir().join(format!("tollgate-cold-path-{}", std::process::id())));
    std::fs::create_dir_all(&dir.0)?;
    eprintln!(
        "cold-path: up to {} cold and {} warm decisions, at most {} s; redis {}",
        bench.decisions,
        bench.decisions,
        bench.seconds,
        redis.url()
    );
    let (_authority, authority_address) = start_authority(&authority, &dir, &redis.url()).await?;
    let admin = AdminApi::connect(&format!("http://{authority_address}"), ADMIN_KEY).await?;
    admin.publish_price(PRICE_MICROS).await?;
    admin
        .seed_accounts(&Funding {
            run_id: RUN_ID.into(),
            accounts: bench.decisions + 1,
            grant_micros: GRANT_CREDITS * 1_000_000,
            overdraft_micros: 0,
            price_micros: PRICE_MICROS,
        })
        .await?;
    let authority_url = format!("http://{authority_address}");
    let (_edge, edge_address, _http) = start_edge_with(
        &edge,
        &redis.url(),
        &[
            ("TOLLGATE_AUTHORITY_URL", authority_url.as_str()),
            ("TOLLGATE_AUTHORITY_API_KEY", ADMIN_KEY),
        ],
    )
    .await?;
    let channel = Channel::from_shared(format!("http://{edge_address}"))?
        .tcp_nodelay(true)
        .connect()
        .await?;
    let warm = account_id(RUN_ID, 0);
    wait_priced(std::slice::from_ref(&channel), API_KEY, &warm, PRICE_MICROS).await?;
    // The region's own view, to check that each cold account holds nothing before its turn.
    let region = RedisRegionStore::connect(&redis.url(), "tg:bench", RETAIN_MS_DEFAULT).await?;

    let mut client = Client::new(channel);
    for n in 0..WARM_UP_DECISIONS {
        decide(&mut client, &warm, format!("warm-up.{n}")).await?;
    }
    let mut warm_figures = Figures::new("Debit strict, warm (region holds)", Duration::ZERO)?;
    let mut cold_figures = Figures::new("Debit strict, cold (asks authority)", Duration::ZERO)?;
    let started = Instant::now();
    let deadline = started + Duration::from_secs(bench.seconds);
    // Each kind's time is the sum of its own calls, so ops/s is what one client would do with
    // decisions of that kind only.
    let record = |figures: &mut Figures, took: Duration| {
        figures
            .latency_us
            .saturating_record(took.as_micros() as u64);
        figures.ops += 1;
        figures.elapsed += took;
    };
    for n in 1..=bench.decisions {
        if Instant::now() >= deadline {
            break;
        }
        let took = decide(&mut client, &warm, format!("warm.{n}")).await?;
        record(&mut warm_figures, took);

        let cold = account_id(RUN_ID, n);
        let held = region.view(&AccountId::new(cold.clone())?, now()).await?;
        if held.pool().is_positive() {
            bail!("{cold}: the region already holds {} for it", held.pool());
        }
        let took = decide(&mut client, &cold, format!("cold.{n}")).await?;
        record(&mut cold_figures, took);
    }
    eprintln!(
        "  {} warm and {} cold decisions in {:.1} s, one at a time, alternating",
        warm_figures.ops,
        cold_figures.ops,
        started.elapsed().as_secs_f64()
    );

    crate::print_header();
    for figures in [&warm_figures, &cold_figures] {
        figures.print_row(warm_figures.ops_per_s());
    }
    println!();
    let (warm_h, cold_h) = (&warm_figures.latency_us, &cold_figures.latency_us);
    println!(
        "cold / warm latency: p50 {} us / {} us = {:.1}x, p99 {} us / {} us = {:.1}x",
        cold_h.value_at_quantile(0.5),
        warm_h.value_at_quantile(0.5),
        cold_h.value_at_quantile(0.5) as f64 / warm_h.value_at_quantile(0.5).max(1) as f64,
        cold_h.value_at_quantile(0.99),
        warm_h.value_at_quantile(0.99),
        cold_h.value_at_quantile(0.99) as f64 / warm_h.value_at_quantile(0.99).max(1) as f64,
    );
    Ok(())
}
