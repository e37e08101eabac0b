//! `run` (one scenario against a deployment's edges, then the audit) and `compare` (the edge
//! next to the baselines under the same offered load).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, ValueEnum};
use serde::Serialize;
use tollgate_core::Credits;
use tollgate_proto::pb;

use crate::drivers::{self, EdgeDriver, PostgresDriver, RedisLuaDriver};
use crate::ledger::{self, AdminApi, Audit, AuditPlan, Funding};
use crate::load::{self, Plan, RateShape, RunFigures, RunLimits};
use crate::report::{self, CompareRow, Series};
use crate::targets::Targets;

/// Most accounts a run may seed.
pub const ACCOUNTS_MAX: u64 = 1_000_000;
/// Highest offered rate, requests per second.
pub const RATE_MAX: f64 = 1_000_000.0;
/// Longest run.
pub const DURATION_MAX: Duration = Duration::from_secs(3_600);

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Scenario {
    /// A fixed offered rate (open loop).
    Steady,
    /// The offered rate grows linearly from --ramp-from to --rate.
    Ramp,
    /// --rate, with --burst-factor times it for --burst-length every --burst-every.
    Burst,
    /// Every request on one account.
    HotAccount,
    /// Requests spread over --accounts accounts (default 100,000; up to 1,000,000).
    ManyAccounts,
    /// Every region's edges at once (needs at least two regions).
    MultiRegion,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    Strict,
    Cached,
}

impl Mode {
    fn wire(self) -> pb::EnforcementMode {
        match self {
            Mode::Strict => pb::EnforcementMode::Strict,
            Mode::Cached => pb::EnforcementMode::Cached,
        }
    }
}

/// Where the load goes and how to reach the authority.
#[derive(Args, Clone, Debug)]
pub struct TargetArgs {
    /// deploy/local's state file (regions, edges, Admin endpoint, API key).
    #[arg(long)]
    pub state: Option<PathBuf>,
    /// A region and its edges: REGION=HOST:PORT[,HOST:PORT…]; repeat for each region.
    #[arg(long = "target", value_name = "REGION=ENDPOINTS")]
    pub targets: Vec<String>,
    /// The authority's Admin endpoint (with --target).
    #[arg(long)]
    pub admin: Option<String>,
    /// API key with the enforce scope on the edges and admin on the authority.
    #[arg(long, env = "TOLLGATE_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
}

impl TargetArgs {
    fn resolve(&self) -> anyhow::Result<Targets> {
        let mut targets = match (&self.state, self.targets.is_empty()) {
            (Some(_), false) => bail!("--state and --target: give one or the other"),
            (Some(path), true) => Targets::from_state(path)?,
            (None, false) => Targets::from_flags(&self.targets)?,
            (None, true) => bail!("--state or --target: say where to send the load"),
        };
        if let Some(admin) = &self.admin {
            targets.admin = Some(admin.clone());
        }
        if let Some(key) = &self.api_key {
            targets.api_key = Some(key.clone());
        }
        if targets.admin.is_none() {
            bail!("--admin: the authority's Admin endpoint is needed for seeding and the audit");
        }
        if targets.api_key.as_deref().is_none_or(str::is_empty) {
            bail!("--api-key (or TOLLGATE_API_KEY): needed to call the edges and the authority");
        }
        Ok(targets)
    }
}

/// Bounds and money shared by `run` and `compare`.
#[derive(Args, Clone, Debug)]
pub struct CommonArgs {
    /// Offered rate, requests per second across all regions (open loop).
    #[arg(long)]
    pub rate: Option<f64>,
    /// How long the load runs (per system for compare), e.g. 10s, 1m.
    #[arg(long)]
    pub duration: Option<String>,
    /// Most requests sent in one run, whatever the rate and duration.
    #[arg(long, default_value_t = 5_000_000)]
    pub max_requests: u64,
    /// Accounts the requests spread over.
    #[arg(long)]
    pub accounts: Option<u64>,
    /// Credits granted to each account.
    #[arg(long)]
    pub grant: Option<String>,
    /// Each account's overdraft limit, in credits.
    #[arg(long, default_value = "0")]
    pub overdraft: String,
    /// Credits one request costs (the price of feature lt_call, 1 call per request).
    #[arg(long, default_value = "0.01")]
    pub price: String,
    /// Requests in flight at most; when reached, further requests wait (their latency still
    /// counts from their intended send time) and those that could not leave are reported.
    #[arg(long, default_value_t = 2_048)]
    pub in_flight_max: usize,
    /// Time limit of one request.
    #[arg(long, default_value = "5s")]
    pub timeout: String,
    /// Longest wait for reconciliation to take in every acknowledged debit before the audit.
    #[arg(long, default_value = "60s")]
    pub audit_wait: String,
    /// Most accounts the audit reads (touched accounts are sampled evenly beyond it).
    #[arg(long, default_value_t = 100_000)]
    pub audit_accounts_max: u64,
    /// Prefix of this run's account ids and idempotency keys (default: lt + the time).
    #[arg(long)]
    pub run_id: Option<String>,
    /// Write the JSON report here.
    #[arg(long)]
    pub report: Option<PathBuf>,
    /// Write an SVG chart (throughput and p99 over time) here.
    #[arg(long)]
    pub chart: Option<PathBuf>,
}

fn duration(flag: &str, text: &str) -> anyhow::Result<Duration> {
    let value = humantime::parse_duration(text)
        .with_context(|| format!("{flag}: {text:?} is not a duration (e.g. 10s, 500ms, 2m)"))?;
    if value.is_zero() || value > DURATION_MAX {
        bail!(
            "{flag}: {text} is outside 1 ms to {} s",
            DURATION_MAX.as_secs()
        );
    }
    Ok(value)
}

fn micros(flag: &str, text: &str, allow_zero: bool) -> anyhow::Result<i64> {
    let value = Credits::parse(text)
        .with_context(|| format!("{flag}: {text:?} is not an amount of credits"))?;
    if value.is_negative() || (!allow_zero && value.is_zero()) {
        bail!(
            "{flag}: {text} must be {}",
            if allow_zero {
                "zero or more"
            } else {
                "more than zero"
            }
        );
    }
    Ok(value.micros())
}

fn rate(flag: &str, value: f64) -> anyhow::Result<f64> {
    if !(value.is_finite() && value > 0.0 && value <= RATE_MAX) {
        bail!("{flag}: {value} is outside 0 to {RATE_MAX} requests per second");
    }
    Ok(value)
}

fn default_run_id() -> String {
    let millis = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    format!("lt{millis:x}")
}

fn run_id(given: &Option<String>) -> anyhow::Result<String> {
    let id = given.clone().unwrap_or_else(default_run_id);
    if id.is_empty() || id.len() > 40 || !id.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
    {
        bail!("--run-id: {id:?} must be 1 to 40 letters, digits or _");
    }
    Ok(id)
}

struct Common {
    limits: RunLimits,
    audit_wait: Duration,
    grant_micros: i64,
    overdraft_micros: i64,
    price_micros: i64,
    run_id: String,
}

impl CommonArgs {
    fn parse(&self, duration_default: &str, grant_default: &str) -> anyhow::Result<Common> {
        if self.max_requests == 0 {
            bail!("--max-requests: must be at least 1");
        }
        if !(1..=load::IN_FLIGHT_MAX).contains(&self.in_flight_max) {
            bail!("--in-flight-max: must be 1 to {}", load::IN_FLIGHT_MAX);
        }
        if !(1..=10_000_000).contains(&self.audit_accounts_max) {
            bail!("--audit-accounts-max: must be 1 to 10000000");
        }
        let audit_wait = duration("--audit-wait", &self.audit_wait)?;
        Ok(Common {
            limits: RunLimits {
                duration: duration(
                    "--duration",
                    self.duration.as_deref().unwrap_or(duration_default),
                )?,
                requests_max: self.max_requests,
                in_flight_max: self.in_flight_max,
                timeout: duration("--timeout", &self.timeout)?,
            },
            audit_wait,
            grant_micros: micros(
                "--grant",
                self.grant.as_deref().unwrap_or(grant_default),
                false,
            )?,
            overdraft_micros: micros("--overdraft", &self.overdraft, true)?,
            price_micros: micros("--price", &self.price, false)?,
            run_id: run_id(&self.run_id)?,
        })
    }
}

#[derive(Args, Clone, Debug)]
pub struct RunArgs {
    #[arg(long, value_enum)]
    pub scenario: Scenario,
    #[command(flatten)]
    pub target: TargetArgs,
    #[command(flatten)]
    pub common: CommonArgs,
    /// Enforcement mode of every request.
    #[arg(long, value_enum, default_value = "cached")]
    pub mode: Mode,
    /// ramp: the offered rate at the start.
    #[arg(long)]
    pub ramp_from: Option<f64>,
    /// burst: how many times --rate a burst offers.
    #[arg(long, default_value_t = 5.0)]
    pub burst_factor: f64,
    /// burst: one burst starts every this long.
    #[arg(long, default_value = "5s")]
    pub burst_every: String,
    /// burst: how long a burst lasts.
    #[arg(long, default_value = "1s")]
    pub burst_length: String,
    /// Percent of requests that re-send an earlier request's idempotency key to another edge
    /// of the same region (0 to 50); the audit checks each key is charged once.
    #[arg(long, default_value_t = 1.0)]
    pub replay_percent: f64,
}

#[derive(Serialize)]
struct RunReport<'a> {
    tool: &'static str,
    scenario: Scenario,
    mode: &'static str,
    shape: &'a RateShape,
    funding: &'a Funding,
    duration_s: f64,
    replay_every: u64,
    figures: &'a RunFigures,
    audit: &'a Audit,
}

fn shape_of(args: &RunArgs, rate_value: f64) -> anyhow::Result<RateShape> {
    Ok(match args.scenario {
        Scenario::Ramp => {
            let from = rate("--ramp-from", args.ramp_from.unwrap_or(rate_value / 10.0))?;
            RateShape::Ramp {
                from,
                to: rate_value,
            }
        }
        Scenario::Burst => {
            if !(args.burst_factor.is_finite() && (1.0..=100.0).contains(&args.burst_factor)) {
                bail!("--burst-factor: {} is outside 1 to 100", args.burst_factor);
            }
            rate("--rate × --burst-factor", rate_value * args.burst_factor)?;
            let every = duration("--burst-every", &args.burst_every)?;
            let length = duration("--burst-length", &args.burst_length)?;
            if length >= every {
                bail!("--burst-length: must be shorter than --burst-every");
            }
            RateShape::Burst {
                rate: rate_value,
                factor: args.burst_factor,
                every_s: every.as_secs_f64(),
                length_s: length.as_secs_f64(),
            }
        }
        _ => RateShape::Steady { rate: rate_value },
    })
}

fn accounts_of(scenario: Scenario, given: Option<u64>) -> anyhow::Result<u64> {
    let accounts = match (scenario, given) {
        (Scenario::HotAccount, Some(n)) if n != 1 => {
            bail!("--accounts: hot-account puts every request on one account")
        }
        (Scenario::HotAccount, _) => 1,
        (Scenario::ManyAccounts, None) => 100_000,
        (_, Some(n)) => n,
        (_, None) => 100,
    };
    if !(1..=ACCOUNTS_MAX).contains(&accounts) {
        bail!("--accounts: {accounts} is outside 1 to {ACCOUNTS_MAX}");
    }
    Ok(accounts)
}

/// Seeds the run's accounts and the price, and waits until every edge prices the feature.
async fn seed(admin: &AdminApi, targets: &Targets, funding: &Funding) -> anyhow::Result<()> {
    eprintln!(
        "seeding run {}: {} accounts of {} credits",
        funding.run_id,
        funding.accounts,
        Credits::from_micros(funding.grant_micros)
    );
    admin.publish_price(funding.price_micros).await?;
    admin.seed_accounts(funding).await?;
    let mut channels = Vec::new();
    for region in &targets.regions {
        for edge in &region.edges {
            channels.push(drivers::connect(edge).await?);
        }
    }
    ledger::wait_priced(
        &channels,
        targets.api_key.as_deref().unwrap_or_default(),
        &drivers::account_id(&funding.run_id, 0),
        funding.price_micros,
    )
    .await
}

pub async fn run(args: RunArgs) -> anyhow::Result<bool> {
    let targets = args.target.resolve()?;
    if args.scenario == Scenario::MultiRegion && targets.regions.len() < 2 {
        bail!(
            "--scenario multi-region: needs at least two regions, {} given",
            targets.regions.len()
        );
    }
    let common = args.common.parse("10s", "1000")?;
    let rate_value = rate("--rate", args.common.rate.unwrap_or(200.0))?;
    let shape = shape_of(&args, rate_value)?;
    let accounts = accounts_of(args.scenario, args.common.accounts)?;
    if !(args.replay_percent.is_finite() && (0.0..=50.0).contains(&args.replay_percent)) {
        bail!(
            "--replay-percent: {} is outside 0 to 50",
            args.replay_percent
        );
    }
    let replay_every = if args.replay_percent > 0.0 {
        (100.0 / args.replay_percent).round().max(2.0) as u64
    } else {
        0
    };
    let api_key = targets.api_key.clone().unwrap_or_default();
    let admin = AdminApi::connect(targets.admin.as_deref().unwrap_or_default(), &api_key).await?;
    let funding = Funding {
        run_id: common.run_id.clone(),
        accounts,
        grant_micros: common.grant_micros,
        overdraft_micros: common.overdraft_micros,
        price_micros: common.price_micros,
    };
    seed(&admin, &targets, &funding).await?;

    let regions: Vec<String> = targets.regions.iter().map(|r| r.name.clone()).collect();
    let plan = Plan {
        edges: targets.regions.iter().map(|r| r.edges.len()).collect(),
        accounts,
        replay_every,
    };
    let driver = Arc::new(
        EdgeDriver::connect(
            &targets.regions,
            &api_key,
            &funding.run_id,
            args.mode.wire(),
        )
        .await?,
    );
    let mode = match args.mode {
        Mode::Strict => "strict",
        Mode::Cached => "cached",
    };
    eprintln!(
        "{:?} ({mode}): {:?} for {:.0} s over {} regions, {} edges, {} accounts",
        args.scenario,
        shape,
        common.limits.duration.as_secs_f64(),
        regions.len(),
        targets.edge_count(),
        accounts
    );
    let system = format!("edge {mode}");
    let figures = load::run(&system, driver, &shape, &plan, &regions, &common.limits).await?;
    report::print_regions(&figures);

    eprintln!("auditing the ledger");
    let audit = ledger::audit(
        &admin,
        AuditPlan {
            funding: &funding,
            regions: &regions,
            decided: &figures.decided,
            wait: common.audit_wait,
            accounts_max: args.common.audit_accounts_max,
        },
    )
    .await?;
    audit.print();
    if let Some(path) = &args.common.report {
        report::write_json(
            path,
            &RunReport {
                tool: "tollgate-loadtest run",
                scenario: args.scenario,
                mode,
                shape: &shape,
                funding: &funding,
                duration_s: common.limits.duration.as_secs_f64(),
                replay_every,
                figures: &figures,
                audit: &audit,
            },
        )?;
    }
    if let Some(path) = &args.common.chart {
        let series: Vec<Series> = figures
            .regions
            .iter()
            .map(|r| Series {
                name: r.region.clone(),
                timeline: &r.timeline,
            })
            .collect();
        let title = format!(
            "tollgate-loadtest {:?} ({mode}), run {}",
            args.scenario, funding.run_id
        );
        report::write_chart(path, &report::chart(&title, &series))?;
    }
    Ok(audit.passed)
}

#[derive(Args, Clone, Debug)]
pub struct CompareArgs {
    #[command(flatten)]
    pub target: TargetArgs,
    #[command(flatten)]
    pub common: CommonArgs,
    /// PostgreSQL for the per-request UPDATE baseline (default: the state file's, else one
    /// started for the run).
    #[arg(long)]
    pub postgres_url: Option<String>,
    /// redis-server for the Lua baseline (default: each region's from the state file, else
    /// one started for the run).
    #[arg(long)]
    pub redis_url: Option<String>,
}

#[derive(Serialize)]
struct CompareReport<'a> {
    tool: &'static str,
    offered_per_s: f64,
    duration_s: f64,
    accounts: u64,
    rows: &'a [CompareRow],
    runs: &'a [RunFigures],
    audits: &'a [Option<Audit>],
}

/// The servers a comparison started for its baselines, kept until it ends.
#[derive(Default)]
struct Started {
    _postgres: Option<tollgate_testkit::PostgresServer>,
    _redis: Option<tollgate_testkit::RedisServer>,
}

pub async fn compare(args: CompareArgs) -> anyhow::Result<bool> {
    let targets = args.target.resolve()?;
    let common = args.common.parse("6s", "1000000")?;
    let rate_value = rate("--rate", args.common.rate.unwrap_or(1_000.0))?;
    let accounts = accounts_of(
        Scenario::Steady,
        Some(args.common.accounts.unwrap_or(1_000)),
    )?;
    let shape = RateShape::Steady { rate: rate_value };
    let api_key = targets.api_key.clone().unwrap_or_default();
    let admin = AdminApi::connect(targets.admin.as_deref().unwrap_or_default(), &api_key).await?;
    let mut started = Started::default();
    let postgres_url = match args.postgres_url.clone().or(targets.postgres_url.clone()) {
        Some(url) => url,
        None => {
            let server = tollgate_testkit::PostgresServer::start()
                .context("--postgres-url not given: starting a PostgreSQL for the baseline")?;
            let url = server.url();
            started._postgres = Some(server);
            url
        }
    };
    let redis_urls: Vec<String> = match &args.redis_url {
        Some(url) => vec![url.clone()],
        None => {
            let known: Vec<String> = targets
                .regions
                .iter()
                .filter_map(|r| r.redis_url.clone())
                .collect();
            if known.len() == targets.regions.len() {
                known
            } else {
                let server = tollgate_testkit::RedisServer::start()
                    .context("--redis-url not given: starting a redis-server for the baseline")?;
                let url = server.url();
                started._redis = Some(server);
                vec![url]
            }
        }
    };
    let regions: Vec<String> = targets.regions.iter().map(|r| r.name.clone()).collect();
    let edge_plan = Plan {
        edges: targets.regions.iter().map(|r| r.edges.len()).collect(),
        accounts,
        replay_every: 0,
    };
    let redis_regions: Vec<String> = if redis_urls.len() == regions.len() {
        regions.clone()
    } else {
        vec!["redis".into()]
    };
    let redis_plan = Plan {
        edges: vec![1; redis_regions.len()],
        ..edge_plan.clone()
    };
    let postgres_plan = Plan {
        edges: vec![1],
        ..edge_plan.clone()
    };
    eprintln!(
        "compare: {rate_value}/s offered for {:.0} s per system, {accounts} accounts, {} regions",
        common.limits.duration.as_secs_f64(),
        regions.len()
    );

    let mut runs: Vec<RunFigures> = Vec::new();
    let mut audits: Vec<Option<Audit>> = Vec::new();
    let mut audit_notes: Vec<String> = Vec::new();

    // Baseline 1: PostgreSQL, one UPDATE per request.
    eprintln!("preparing the PostgreSQL baseline ({} rows)", accounts);
    let postgres = Arc::new(
        PostgresDriver::prepare(
            &postgres_url,
            drivers::POSTGRES_TABLE,
            accounts,
            common.grant_micros,
            common.price_micros,
            64,
        )
        .await?,
    );
    let figures = load::run(
        "postgres UPDATE (baseline)",
        Arc::clone(&postgres) as Arc<dyn load::Driver>,
        &shape,
        &postgres_plan,
        &["postgres".into()],
        &common.limits,
    )
    .await?;
    let acknowledged: i64 = figures
        .decided
        .iter()
        .filter(|d| d.allowed)
        .map(|d| d.cost_micros)
        .sum();
    let (passed, detail) = postgres
        .audit(
            drivers::POSTGRES_TABLE,
            accounts,
            common.grant_micros,
            acknowledged,
        )
        .await?;
    audit_notes.push(if passed {
        "table ok".into()
    } else {
        format!("FAILED: {detail}")
    });
    audits.push(None);
    runs.push(figures);

    // Baseline 2: the regional store's strict Lua debit, no edge.
    let lua_run = format!("{}b", common.run_id);
    eprintln!(
        "preparing the Redis Lua baseline ({} accounts per redis-server)",
        accounts
    );
    let lua = Arc::new(
        RedisLuaDriver::prepare(
            &redis_urls,
            "tg:loadtest-baseline",
            &lua_run,
            accounts,
            common.grant_micros,
            common.price_micros,
        )
        .await?,
    );
    runs.push(
        load::run(
            "redis Lua debit, no edge (baseline)",
            lua,
            &shape,
            &redis_plan,
            &redis_regions,
            &common.limits,
        )
        .await?,
    );
    audits.push(None);
    audit_notes.push("n/a (no ledger)".into());

    // The edges, strict then cached, each on fresh accounts, each audited against the ledger.
    for mode in [Mode::Strict, Mode::Cached] {
        let suffix = match mode {
            Mode::Strict => "s",
            Mode::Cached => "c",
        };
        let funding = Funding {
            run_id: format!("{}{suffix}", common.run_id),
            accounts,
            grant_micros: common.grant_micros,
            overdraft_micros: common.overdraft_micros,
            price_micros: common.price_micros,
        };
        seed(&admin, &targets, &funding).await?;
        let driver = Arc::new(
            EdgeDriver::connect(&targets.regions, &api_key, &funding.run_id, mode.wire()).await?,
        );
        let name = match mode {
            Mode::Strict => "edge strict (Lua per request)",
            Mode::Cached => "edge cached (leases)",
        };
        // The baselines hold every account already; take the edges' cold path (one allocation
        // per account and region through the authority) before measuring their hot path.
        let warmed = warm_up(driver.as_ref(), &edge_plan, &regions, &common.limits).await?;
        let mut figures = load::run(
            name,
            Arc::clone(&driver) as Arc<dyn load::Driver>,
            &shape,
            &edge_plan,
            &regions,
            &common.limits,
        )
        .await?;
        figures.decided.extend(warmed);
        let audit = ledger::audit(
            &admin,
            AuditPlan {
                funding: &funding,
                regions: &regions,
                decided: &figures.decided,
                wait: common.audit_wait,
                accounts_max: args.common.audit_accounts_max,
            },
        )
        .await?;
        audit.print();
        audit_notes.push(if audit.passed {
            "ledger ok".into()
        } else {
            "FAILED".into()
        });
        audits.push(Some(audit));
        runs.push(figures);
    }

    let cached = runs
        .last()
        .map(|r| (r.ops_per_s, r.latency.p99_us))
        .unwrap_or((1.0, 1));
    let rows: Vec<CompareRow> = runs
        .iter()
        .zip(&audit_notes)
        .map(|(run, audit)| CompareRow {
            system: run.system.clone(),
            offered_per_s: rate_value,
            ops_per_s: run.ops_per_s,
            p50_us: run.latency.p50_us,
            p99_us: run.latency.p99_us,
            p999_us: run.latency.p999_us,
            refused: run.refused,
            errors: run.errors,
            unsent: run.unsent,
            throughput_vs_cached: run.ops_per_s / cached.0.max(1e-9),
            p99_vs_cached: run.latency.p99_us as f64 / cached.1.max(1) as f64,
            audit: audit.clone(),
        })
        .collect();
    println!();
    report::print_compare(&rows);
    let passed = !audit_notes.iter().any(|note| note.starts_with("FAILED"));
    if let Some(path) = &args.common.report {
        report::write_json(
            path,
            &CompareReport {
                tool: "tollgate-loadtest compare",
                offered_per_s: rate_value,
                duration_s: common.limits.duration.as_secs_f64(),
                accounts,
                rows: &rows,
                runs: &runs,
                audits: &audits,
            },
        )?;
    }
    if let Some(path) = &args.common.chart {
        // One line per system: the sum of its regions, second by second.
        let merged: Vec<Vec<load::Second>> = runs.iter().map(merge_regions).collect();
        let series: Vec<Series> = runs
            .iter()
            .zip(&merged)
            .map(|(run, timeline)| Series {
                name: run.system.clone(),
                timeline,
            })
            .collect();
        let title =
            format!("tollgate-loadtest compare: {rate_value}/s offered, {accounts} accounts");
        report::write_chart(path, &report::chart(&title, &series))?;
    }
    drop(started);
    Ok(passed)
}

/// Key indices of the warm-up debits (far above any run's request count).
const WARM_UP_KEY_BASE: u64 = 1 << 60;
/// Tries of one account's warm-up debit in one region.
const WARM_UP_TRIES_MAX: u32 = 30;
/// Warm-up debits in flight.
const WARM_UP_PARALLEL: usize = 32;
/// Longest the whole warm-up may take.
const WARM_UP_S_MAX: u64 = 600;

/// One debit per account and edge, retried (bounded) until the region has an allocation for
/// the account; returns the decided debits for the audit.
async fn warm_up(
    driver: &EdgeDriver,
    plan: &Plan,
    regions: &[String],
    limits: &RunLimits,
) -> anyhow::Result<Vec<load::Decided>> {
    use futures_util::StreamExt;
    let started = std::time::Instant::now();
    let deadline = started + Duration::from_secs(WARM_UP_S_MAX);
    // Every edge of every region: in cached mode each edge takes a lease of its own.
    let triples = (0..plan.accounts).flat_map(|account| {
        (0..regions.len())
            .flat_map(move |r| (0..plan.edges[r].max(1)).map(move |edge| (account, r, edge)))
    });
    let edges_max = crate::targets::EDGES_PER_REGION_MAX as u64;
    let results: Vec<(Vec<load::Decided>, bool)> = futures_util::stream::iter(triples)
        .map(|(account, region, edge)| async move {
            let key_index = WARM_UP_KEY_BASE
                + (account * regions.len() as u64 + region as u64) * edges_max
                + edge as u64;
            let request = load::Request {
                region,
                edge,
                account,
                key_index,
            };
            let decided = |cost_micros, allowed| load::Decided {
                region: region as u16,
                account,
                key_index,
                cost_micros,
                allowed,
            };
            let mut seen = Vec::new();
            for _ in 0..WARM_UP_TRIES_MAX {
                let outcome =
                    tokio::time::timeout(limits.timeout, driver.call_now(request.clone()))
                        .await
                        .unwrap_or(load::Outcome::Error {
                            code: "timeout".into(),
                            unknown: true,
                        });
                match outcome {
                    load::Outcome::Allowed { cost_micros } => {
                        seen.push(decided(cost_micros, true));
                        return (seen, true);
                    }
                    load::Outcome::Error { unknown: true, .. } => seen.push(decided(0, false)),
                    _ => {}
                }
                if std::time::Instant::now() >= deadline {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            (seen, false)
        })
        .buffer_unordered(WARM_UP_PARALLEL)
        .collect()
        .await;
    let cold = results.iter().filter(|(_, warm)| !warm).count();
    eprintln!(
        "  warm-up: {} account-edges in {:.1} s, {cold} still cold",
        results.len(),
        started.elapsed().as_secs_f64()
    );
    Ok(results.into_iter().flat_map(|(seen, _)| seen).collect())
}

/// A run's timeline with its regions added up (p99: the worst region's).
fn merge_regions(run: &RunFigures) -> Vec<load::Second> {
    let seconds = run
        .regions
        .iter()
        .map(|r| r.timeline.len())
        .max()
        .unwrap_or(0);
    (0..seconds)
        .map(|index| {
            let mut merged = load::Second {
                t_s: index as u64 + 1,
                ..Default::default()
            };
            for second in run.regions.iter().filter_map(|r| r.timeline.get(index)) {
                merged.ok += second.ok;
                merged.refused += second.refused;
                merged.errors += second.errors;
                merged.p50_us = merged.p50_us.max(second.p50_us);
                merged.p99_us = merged.p99_us.max(second.p99_us);
            }
            merged
        })
        .collect()
}
