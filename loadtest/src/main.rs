//! `tollgate-loadtest`: the SRE's load generator. Every run measures Tollgate next to baselines
//! written here, in the same run and on the same server, and reports ratios: the machine is
//! noisy, so absolute numbers are only indicative.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use hdrhistogram::Histogram;
use tollgate_core::{Credits, Timestamp};
use tollgate_region::conformance::{account, debit_command, segment};
use tollgate_region::{
    DebitOutcome, MemoryRegionStore, RedisRegionStore, RegionStore, REGION_MICROS_MAX,
    RETAIN_MS_DEFAULT,
};
use tollgate_testkit::RedisServer;

/// Longest a scenario may run, whatever is asked.
const DURATION_S_MAX: u64 = 600;
/// Most concurrent clients.
const CLIENTS_MAX: usize = 1_024;
/// Slowest latency the histograms record, in microseconds (10 s).
pub(crate) const LATENCY_US_MAX: u64 = 10_000_000;

mod cold_path;
mod drivers;
mod edge_bench;
mod ledger;
mod load;
mod price_churn;
mod report;
mod scenario;
mod targets;

#[derive(Parser)]
#[command(
    name = "tollgate-loadtest",
    version,
    about = "Load tests for Tollgate, with baselines side by side."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// One scenario against a deployment's edges (deploy/local's state file, or --target and
    /// --admin), open loop at the offered rate; per-region throughput and latency, then an
    /// audit of the ledger through the Admin API. Exits 1 when the audit fails.
    ///
    /// Example: tollgate-loadtest run --scenario multi-region --state .tollgate-local/state.json --rate 500 --duration 10s --report run.json --chart run.svg
    Run(scenario::RunArgs),
    /// The edge (strict and cached) next to baselines under the same offered load: a
    /// per-request PostgreSQL UPDATE, and the regional store's Lua debit without an edge; one
    /// table of ratios to the edge in cached mode. The edge runs are audited like `run`.
    ///
    /// Example: tollgate-loadtest compare --state .tollgate-local/state.json --rate 2000 --duration 6s --report compare.json --chart compare.svg
    Compare(scenario::CompareArgs),
    /// What atomicity costs: the regional store's Lua debit next to a plain DECRBY on the same
    /// redis-server, and the in-memory store, each with the same clients for the same time.
    ///
    /// Example: tollgate-loadtest region-bench --clients 32 --seconds 10
    RegionBench {
        /// Concurrent clients per scenario.
        #[arg(long, default_value_t = 32)]
        clients: usize,
        /// Seconds per scenario.
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        /// Accounts the clients spread over (1: every client on one hot account).
        #[arg(long, default_value_t = 1)]
        accounts: usize,
        /// An existing redis-server (loopback only); by default one is started for the run.
        #[arg(long)]
        redis_url: Option<String>,
        /// AOF fsync policy of the started redis-server: `always` (production's) or `everysec`
        /// (takes the disk off the path, to see the CPU cost alone).
        #[arg(long, default_value = "always")]
        fsync: String,
    },
    /// The edge's hot path over gRPC from this process: strict and cached Debit on one account
    /// and on many, the Enforce stream, and cached mode at half its throughput (open loop), next
    /// to a gRPC health check on the same server. Starts its own redis-server and tollgate-edge.
    ///
    /// Example: tollgate-loadtest edge-bench --clients 64 --seconds 10 --accounts 100000
    EdgeBench {
        /// Concurrent unary clients per scenario.
        #[arg(long, default_value_t = 64)]
        clients: usize,
        /// Seconds per scenario.
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        /// Accounts of the "many accounts" scenarios.
        #[arg(long, default_value_t = 100_000)]
        accounts: usize,
        /// Concurrent Enforce streams.
        #[arg(long, default_value_t = 8)]
        streams: usize,
        /// The tollgate-edge binary; by default the one beside this program.
        #[arg(long)]
        edge_binary: Option<std::path::PathBuf>,
    },
    /// What the cold path costs: a strict Debit whose cost exceeds what the region holds for
    /// the account (the edge asks the authority over gRPC within the request) next to a warm
    /// one (the region holds enough), alternating, one at a time, from the same client; p50
    /// and p99 of both and their ratio. Starts its own redis-server, tollgate-authority (serve,
    /// SQLite, that Redis as its one region) and tollgate-edge.
    ///
    /// Example: tollgate-loadtest cold-path --decisions 500 --seconds 10
    ColdPath {
        /// Cold decisions, and as many warm ones; one account is seeded per cold decision.
        #[arg(long, default_value_t = 500)]
        decisions: u64,
        /// The measured part stops after this many seconds even when decisions are left.
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        /// The tollgate-edge binary; by default the one beside this program.
        #[arg(long)]
        edge_binary: Option<std::path::PathBuf>,
        /// The tollgate-authority binary; by default the one beside this program.
        #[arg(long)]
        authority_binary: Option<std::path::PathBuf>,
    },
    /// Sustained debits on the edge while a new price book version is published every
    /// interval, next to the same load with prices unchanged, in cached and strict mode. Every
    /// decision's cost is checked against the rate of the version it names; any decision priced
    /// with a mix of versions fails the run. Starts its own redis-server and tollgate-edge.
    ///
    /// Example: tollgate-loadtest price-churn --clients 32 --seconds 10 --accounts 1000
    PriceChurn {
        /// Concurrent unary clients.
        #[arg(long, default_value_t = 32)]
        clients: usize,
        /// Seconds per scenario (four scenarios).
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        /// Accounts the debits spread over.
        #[arg(long, default_value_t = 1_000)]
        accounts: usize,
        /// Milliseconds between two publications.
        #[arg(long, default_value_t = 1_000)]
        interval_ms: u64,
        /// The tollgate-edge binary; by default the one beside this program.
        #[arg(long)]
        edge_binary: Option<std::path::PathBuf>,
    },
}

pub(crate) struct Figures {
    name: &'static str,
    ops: u64,
    errors: u64,
    first_error: Option<String>,
    elapsed: Duration,
    latency_us: Histogram<u64>,
}

impl Figures {
    pub(crate) fn new(name: &'static str, elapsed: Duration) -> anyhow::Result<Figures> {
        Ok(Figures {
            name,
            ops: 0,
            errors: 0,
            first_error: None,
            elapsed,
            latency_us: Histogram::new_with_bounds(1, LATENCY_US_MAX, 3)?,
        })
    }

    pub(crate) fn ops_per_s(&self) -> f64 {
        self.ops as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// One row of the results table; the last column is throughput relative to the baseline.
    pub(crate) fn print_row(&self, baseline_ops_per_s: f64) {
        let h = &self.latency_us;
        println!(
            "{:<34} {:>10} {:>10.0} {:>8} {:>8} {:>8} {:>7} {:>9.3}",
            self.name,
            self.ops,
            self.ops_per_s(),
            h.value_at_quantile(0.5),
            h.value_at_quantile(0.99),
            h.value_at_quantile(0.999),
            self.errors,
            self.ops_per_s() / baseline_ops_per_s.max(1e-9),
        );
    }
}

/// The header of the results table.
pub(crate) fn print_header() {
    println!(
        "{:<34} {:>10} {:>10} {:>8} {:>8} {:>8} {:>7} {:>9}",
        "scenario", "ops", "ops/s", "p50 us", "p99 us", "p999 us", "errors", "vs base"
    );
}

/// Runs `clients` loops of `op` for `seconds`, timing each call.
pub(crate) async fn scenario<F, Fut>(
    name: &'static str,
    clients: usize,
    seconds: u64,
    op: F,
) -> anyhow::Result<Figures>
where
    F: Fn(usize, u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = anyhow::Result<()>> + Send,
{
    let op = Arc::new(op);
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(clients);
    for client in 0..clients {
        let op = Arc::clone(&op);
        tasks.push(tokio::spawn(async move {
            let mut latency_us = Histogram::<u64>::new_with_bounds(1, LATENCY_US_MAX, 3)?;
            let (mut ops, mut errors, mut sequence) = (0_u64, 0_u64, 0_u64);
            let mut first_error = None;
            while Instant::now() < deadline {
                let began = Instant::now();
                let result = op(client, sequence).await;
                latency_us.saturating_record(began.elapsed().as_micros() as u64);
                sequence += 1;
                match result {
                    Ok(()) => ops += 1,
                    Err(error) => {
                        errors += 1;
                        first_error.get_or_insert_with(|| error.to_string());
                    }
                }
            }
            anyhow::Ok((latency_us, ops, errors, first_error))
        }));
    }
    let mut figures = Figures::new(name, Duration::ZERO)?;
    for task in tasks {
        let (latency_us, ops, errors, first_error) = task.await??;
        figures.latency_us.add(&latency_us)?;
        figures.ops += ops;
        figures.errors += errors;
        if figures.first_error.is_none() {
            figures.first_error = first_error;
        }
    }
    figures.elapsed = started.elapsed();
    eprintln!(
        "  {name}: {} ops in {:.1} s",
        figures.ops,
        figures.elapsed.as_secs_f64()
    );
    if let Some(error) = &figures.first_error {
        eprintln!("  {name}: {} errors, the first: {error}", figures.errors);
    }
    Ok(figures)
}

fn now() -> Timestamp {
    let millis = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64);
    Timestamp::from_millis(millis).unwrap_or(Timestamp::EPOCH)
}

async fn fund<S: RegionStore>(store: &S, accounts: usize) -> anyhow::Result<()> {
    for index in 0..accounts {
        let mut spec = segment("bench-grant", "1", 50, None);
        spec.amount = Credits::from_micros(REGION_MICROS_MAX);
        spec.effective_at = Timestamp::EPOCH;
        let key = tollgate_region::conformance::key(&format!("fund-{index}"));
        store
            .install_segment(&account(&format!("bench-{index}")), &key, &spec, now())
            .await?;
    }
    Ok(())
}

/// One debit of 0.001 credits by `client`; keys never repeat, so every call moves credits.
async fn debit_once<S: RegionStore>(
    store: &S,
    accounts: usize,
    client: usize,
    sequence: u64,
) -> anyhow::Result<()> {
    let who = account(&format!(
        "bench-{}",
        (client + sequence as usize) % accounts
    ));
    let command = debit_command(
        &who,
        &format!("k{client}-{sequence}"),
        "gen",
        "0.001",
        now(),
    );
    match store.debit(&command).await? {
        DebitOutcome::Allowed(_) => Ok(()),
        DebitOutcome::Refused(refusal) => bail!("refused: {refusal:?}"),
    }
}

async fn region_bench(
    clients: usize,
    seconds: u64,
    accounts: usize,
    redis_url: Option<String>,
    fsync: String,
) -> anyhow::Result<()> {
    let fsync = match fsync.as_str() {
        "always" => tollgate_testkit::redis::Fsync::Always,
        "everysec" => tollgate_testkit::redis::Fsync::EverySecond,
        other => bail!("--fsync: {other:?} is neither always nor everysec"),
    };
    let clients = clients.clamp(1, CLIENTS_MAX);
    let seconds = seconds.clamp(1, DURATION_S_MAX);
    let accounts = accounts.max(1);
    let server = match &redis_url {
        Some(url)
            if !(url.contains("127.0.0.1")
                || url.contains("localhost")
                || url.contains("[::1]")) =>
        {
            bail!("--redis-url must point at this machine (127.0.0.1, localhost or [::1])")
        }
        Some(_) => None,
        None => Some(
            RedisServer::start_with_fsync(fsync)
                .context("start a redis-server for the benchmark")?,
        ),
    };
    let url =
        redis_url.unwrap_or_else(|| server.as_ref().map(RedisServer::url).unwrap_or_default());
    eprintln!(
        "region-bench: {clients} clients, {seconds} s per scenario, {accounts} account(s), {url}"
    );

    let redis_store =
        Arc::new(RedisRegionStore::connect(&url, "tg:bench", RETAIN_MS_DEFAULT).await?);
    fund(redis_store.as_ref(), accounts).await?;
    let memory_store = Arc::new(MemoryRegionStore::default());
    fund(memory_store.as_ref(), accounts).await?;
    let mut connection = redis_store.connection();
    for index in 0..accounts {
        let _: () = redis::cmd("SET")
            .arg(format!("tg:bench:plain:{index}"))
            .arg(REGION_MICROS_MAX)
            .query_async(&mut connection)
            .await?;
    }

    let plain = redis_store.connection();
    let decrby = scenario(
        "redis DECRBY (baseline)",
        clients,
        seconds,
        move |client, sequence| {
            let mut connection = plain.clone();
            async move {
                let key = format!("tg:bench:plain:{}", (client + sequence as usize) % accounts);
                let _: i64 = redis::cmd("DECRBY")
                    .arg(key)
                    .arg(1_000)
                    .query_async(&mut connection)
                    .await?;
                Ok(())
            }
        },
    )
    .await?;
    let store = Arc::clone(&redis_store);
    let lua = scenario(
        "redis Lua debit (strict mode)",
        clients,
        seconds,
        move |client, sequence| {
            let store = Arc::clone(&store);
            async move { debit_once(store.as_ref(), accounts, client, sequence).await }
        },
    )
    .await?;
    let store = Arc::clone(&memory_store);
    let memory = scenario(
        "in-memory debit (embedded)",
        clients,
        seconds,
        move |client, sequence| {
            let store = Arc::clone(&store);
            async move { debit_once(store.as_ref(), accounts, client, sequence).await }
        },
    )
    .await?;

    print_header();
    for figures in [&decrby, &lua, &memory] {
        figures.print_row(decrby.ops_per_s());
    }
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Run(args) => exit_on_failed_audit(scenario::run(args).await?),
        Command::Compare(args) => exit_on_failed_audit(scenario::compare(args).await?),
        Command::RegionBench {
            clients,
            seconds,
            accounts,
            redis_url,
            fsync,
        } => region_bench(clients, seconds, accounts, redis_url, fsync).await,
        Command::EdgeBench {
            clients,
            seconds,
            accounts,
            streams,
            edge_binary,
        } => {
            let bench = edge_bench::EdgeBench {
                clients: clients.clamp(1, CLIENTS_MAX),
                seconds: seconds.clamp(1, DURATION_S_MAX),
                accounts: accounts.clamp(1, 10_000_000),
                streams: streams.clamp(1, 256),
                edge_binary,
            };
            edge_bench::run(bench).await
        }
        Command::ColdPath {
            decisions,
            seconds,
            edge_binary,
            authority_binary,
        } => {
            cold_path::run(cold_path::ColdPath {
                decisions: decisions.clamp(1, cold_path::DECISIONS_MAX),
                seconds: seconds.clamp(1, DURATION_S_MAX),
                edge_binary,
                authority_binary,
            })
            .await
        }
        Command::PriceChurn {
            clients,
            seconds,
            accounts,
            interval_ms,
            edge_binary,
        } => {
            if !(100..=60_000).contains(&interval_ms) {
                anyhow::bail!("--interval-ms: {interval_ms}, between 100 and 60000 allowed");
            }
            price_churn::run(price_churn::PriceChurn {
                clients: clients.clamp(1, CLIENTS_MAX),
                seconds: seconds.clamp(1, DURATION_S_MAX),
                accounts: accounts.clamp(1, 10_000_000),
                interval_ms,
                edge_binary,
            })
            .await
        }
    }
}

/// A failed audit is the run's verdict: exit status 1 after everything was printed and written.
fn exit_on_failed_audit(passed: bool) -> anyhow::Result<()> {
    if !passed {
        eprintln!("the audit FAILED");
        std::process::exit(1);
    }
    Ok(())
}
