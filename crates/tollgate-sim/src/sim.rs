//! The world and its steps: regions (a fault-injecting in-memory store each), edges (engines in
//! strict or cached mode), the authority on a SQLite ledger, one virtual clock; a seeded choice
//! of operation or fault per step, and the invariants checked after every step.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use sha2::{Digest, Sha256};
use tollgate_authority::state::{ParkedFilter, PARKED_PAGE_MAX};
use tollgate_authority::{Authority, AuthorityError, AuthoritySettings, Feature, StateStore};
use tollgate_core::command::{CreateAccount, GrantTerms, IssueGrant, Memo, Metadata, Refund};
use tollgate_core::EntryKind;
use tollgate_core::{
    AccountId, Credits, DebitId, FeatureKey, GrantId, GrantSource, HoldId, IdempotencyKey, LeaseId,
    PriceBookVersion, Quantity, Rate, RegionId, Scope, Timestamp,
};
use tollgate_edge::{
    AuthorizeRequest, DebitRequest, Decision, EdgeSettings, Engine, EngineError, Refused, Spend,
};
use tollgate_ledger::{
    AccountSnapshot, DebitQuery, EntryFilter, LedgerError, LedgerStore, PageRequest, SqliteLedger,
    PAGE_SIZE_MAX,
};
use tollgate_region::{EnforcementMode, HoldRefusal, RegionStore, ReverseRefusal};

use crate::faulty::{AnswerLost, DebitFault, FaultyRegion, InstallFault};
use crate::link::{AuthorityLink, Node, RegionAllocator};
use crate::oracle::{DecisionKind, OracleFigures};
use crate::rng::Rng;
use crate::shadow::ShadowAccount;

mod decisions;

use decisions::{Decided, Refusal};

type Edge = Engine<FaultyRegion>;

const MICROS: i64 = 1_000_000;
/// Where the virtual clock starts.
const START_MS: i64 = 1_800_000_000_000;
/// The edges' flush interval (the bound on what a crash may lose).
pub const FLUSH_INTERVAL_MS: i64 = 10;
/// How often the edges' lease maintenance runs (as the edge's own task does).
const MAINTENANCE_MS: i64 = 1_000;
/// The regions' idempotency retention: a day, as in production.
const RETAIN_MS: i64 = 24 * 3_600_000;
/// Client retries replay keys at most this old (well inside the retention).
const REPLAY_AGE_MS_MAX: i64 = 3_600_000;
/// The edges' reverse window (the default, five minutes).
const REVERSE_WINDOW_MS: i64 = 5 * 60_000;
/// How long an edge waits for other edges to give back their leases (real time).
const RECALL_WAIT_MS: u64 = 10;
/// Iterations of one clock advance at most (every loop is bounded).
const ADVANCE_ITERATIONS_MAX: usize = 10_000;
/// Replayable requests and holds remembered at most (oldest forgotten first).
const REMEMBERED_MAX: usize = 2_000;
/// Grants holding credits an account may keep before its new grants all expire. The workload
/// issues credits faster than its traffic spends them, half of them never expiring: without a
/// bound, every allocation and reconciliation of a long history reads ever more grants and the
/// history slows down step after step (see docs/simulation.md, "Long runs").
const LIVE_GRANTS_MAX: usize = 48;
/// How long a grant issued past [`LIVE_GRANTS_MAX`] lasts.
const CROWDED_GRANT_MS: i64 = 10 * 60_000;
/// Lines of the trace kept to print on a failure.
const RECENT_LINES: usize = 40;

/// What to run.
#[derive(Clone, Debug)]
pub struct Config {
    pub seed: u64,
    pub ops: u64,
    pub regions: usize,
    pub edges_per_region: usize,
    pub accounts_max: usize,
    /// Full ledger verification (hash chains, grants) and the per-key comparison every this
    /// many steps, and at the end.
    pub verify_every: u64,
    pub faults: bool,
    /// With one region, a false refusal (see `crate::oracle`) breaks the run. Off only to
    /// measure how many there are (`--count-false-refusals`); the tests never turn it off.
    pub false_refusals_fail: bool,
    /// Print every step's line of the trace as it happens (replaying one seed).
    pub print_trace: bool,
}

impl Config {
    pub fn new(seed: u64, ops: u64) -> Self {
        Config {
            seed,
            ops,
            regions: 2,
            edges_per_region: 2,
            accounts_max: 5,
            verify_every: 50,
            faults: true,
            false_refusals_fail: true,
            print_trace: false,
        }
    }
}

/// What a run did.
#[derive(Clone, Debug, Default)]
pub struct Report {
    pub seed: u64,
    pub regions: usize,
    pub steps: u64,
    pub trace_hash: String,
    pub ops: BTreeMap<&'static str, u64>,
    pub faults: BTreeMap<&'static str, u64>,
    /// Invariant checks that ran (each one a named property of one account or of the run).
    pub checks: u64,
    pub verifies: u64,
    pub acknowledged: u64,
    pub charged: u64,
    /// Cached decisions lost with a crashed edge (never flushed), and their credits.
    pub lost_crash_entries: u64,
    pub lost_crash_micros: i64,
    /// Of those, decisions a client retry then made again (charged once).
    pub lost_then_retried: u64,
    /// Cached decisions the edges counted lost (flushed after their lease expired, and refused
    /// by the region).
    pub lost_edge_entries: u64,
    /// Debits applied in a region whose answer was lost (the edge answered an error), and
    /// client retries of a debit that failed on an injected debit fault.
    pub answers_lost: u64,
    pub client_retries: u64,
    /// Checks of `served = charged + parked + pending` (one per account per step).
    pub served_checks: u64,
    pub reversals: u64,
    pub admin_refunds: u64,
    /// Every spending decision compared with the reference model.
    pub oracle: OracleFigures,
    /// Wall-clock seconds spent per operation and per check (where a long history spends its
    /// time; never part of the trace).
    pub seconds: BTreeMap<&'static str, f64>,
}

/// A broken invariant, with what is needed to replay it.
#[derive(Clone, Debug)]
pub struct Failure {
    pub seed: u64,
    pub step: u64,
    pub message: String,
    pub recent: Vec<String>,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "simulation failed: seed {} step {}: {}",
            self.seed, self.step, self.message
        )?;
        writeln!(f, "last steps:")?;
        for line in &self.recent {
            writeln!(f, "  {line}")?;
        }
        write!(
            f,
            "replay with: cargo run -p tollgate-sim -- --seed {} --ops {}",
            self.seed,
            self.step + 1
        )
    }
}

/// One virtual clock for every part.
#[derive(Debug)]
pub struct VirtualClock(AtomicI64);

impl VirtualClock {
    fn ms(&self) -> i64 {
        self.0.load(Ordering::SeqCst)
    }
    fn set_ms(&self, ms: i64) {
        self.0.store(ms, Ordering::SeqCst);
    }
    fn at(&self) -> Timestamp {
        Timestamp::from_millis(self.ms()).unwrap_or(Timestamp::MAX)
    }
}

impl tollgate_edge::Clock for VirtualClock {
    fn now(&self) -> Timestamp {
        self.at()
    }
}

impl tollgate_authority::Clock for VirtualClock {
    fn now(&self) -> Timestamp {
        self.at()
    }
}

struct AccountSim {
    id: AccountId,
    overdraft_micros: i64,
    granted_micros: i64,
    admin_refunded_micros: i64,
}

struct EdgeSlot {
    uid: u64,
    region: usize,
    mode: EnforcementMode,
    engine: Edge,
    /// The edge's own connection to its region (a partition cuts this one alone).
    store: Arc<FaultyRegion>,
    /// The step until which the edge is partitioned from its region (0: not partitioned).
    cut_until: u64,
    /// The last virtual time the edge was seen partitioned.
    last_cut_ms: i64,
    /// The partition lets the clock run as usual (its lease may pass its deadline).
    long_cut: bool,
    /// Cached decisions this edge acknowledged and has not flushed: (region key, decided at).
    unflushed: Vec<(String, i64)>,
    lost_entries_seen: u64,
    /// The edge's answer to recall notices (other edges asking for its leases); it dies with
    /// the edge.
    _recall_listener: Listener,
}

/// A background task that ends when its owner is dropped (an edge that crashes or stops).
struct Listener(tokio::task::JoinHandle<()>);

impl Drop for Listener {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// An acknowledged spend (a debit or a capture), by region and idempotency key.
struct Ack {
    account: usize,
    cost: i64,
    at_ms: i64,
    debit_id: String,
    /// Reached the regional store (strict, or flushed).
    durable: bool,
    /// Edges holding it unflushed.
    on_edges: Vec<u64>,
    lost: bool,
    capture: bool,
    reversed: bool,
    admin_refunded: i64,
    /// A caller was told it is done. False for a debit the region applied whose answer was
    /// lost, until a client retry is answered.
    answered: bool,
    /// Found in the ledger (a debit under its id), or parked by the authority.
    in_ledger: bool,
    parked: bool,
}

/// A debit request a client may retry.
#[derive(Clone)]
struct Request {
    region: usize,
    account: usize,
    key: String,
    feature: &'static str,
    cost: Credits,
    at_ms: i64,
}

/// A debit a client sends again because its first attempt failed on an injected debit fault
/// (its answer lost, or slower than the store timeout): the same request under the same key.
#[derive(Clone)]
struct Retry {
    region: usize,
    account: usize,
    key: String,
    feature: &'static str,
    spend: Spend,
}

/// Per account, where the spends served stand (micro-credits); see `Sim::check_served`.
#[derive(Clone, Copy, Debug, Default)]
struct ServedParts {
    served: i64,
    charged: i64,
    parked: i64,
    pending_edges: i64,
    pending_region: i64,
}

struct HoldSim {
    region: usize,
    account: usize,
    hold_id: HoldId,
    amount: i64,
    expires_ms: i64,
    open: bool,
}

type Step = Result<String, String>;

pub struct Sim {
    cfg: Config,
    rng: Rng,
    clock: Arc<VirtualClock>,
    _dir: tempfile::TempDir,
    ledger: Arc<SqliteLedger>,
    state_url: String,
    region_ids: Vec<RegionId>,
    stores: Vec<Arc<FaultyRegion>>,
    node: Arc<Node>,
    /// The edges' way to the authority (the cold path), with its fault switch.
    link: Arc<AuthorityLink>,
    /// The step until which the link is cut.
    cut_until: u64,
    edges: Vec<EdgeSlot>,
    next_uid: u64,
    accounts: Vec<AccountSim>,
    /// Per account, the reference model's view (see `crate::shadow`).
    shadows: Vec<ShadowAccount>,
    acks: BTreeMap<(usize, String), Ack>,
    /// Acknowledged spends in the order they were first acknowledged (and so by time).
    ack_order: Vec<(usize, String)>,
    /// Per account: acknowledged spends not lost, and of those the reversed ones (micros).
    acked: Vec<(i64, i64)>,
    /// Per account: debits applied in a region whose answer was lost and no retry answered
    /// yet (micros).
    unanswered: Vec<i64>,
    /// Spends (answered or applied) not yet found in the ledger nor parked: on their way.
    unbilled: BTreeSet<(usize, String)>,
    /// Per account: the ledger's `debited` when the unbilled spends were last looked up.
    debited_seen: Vec<i64>,
    /// Spends parked by the authority, and debits applied with their answer lost that no
    /// retry has answered yet.
    parked: BTreeSet<(usize, String)>,
    unanswered_ids: BTreeSet<(usize, String)>,
    /// Debits that failed on an injected debit fault, waiting for the client's retry.
    retries: VecDeque<Retry>,
    /// Debit faults fired in all regions before the current edge call.
    debit_faults_mark: u64,
    requests: VecDeque<Request>,
    holds: VecDeque<HoldSim>,
    /// Per region: the step until which it is down, and until which reconciliation is delayed.
    down_until: Vec<u64>,
    delayed_until: Vec<u64>,
    /// Per region: the last virtual time it was seen down.
    last_down_ms: Vec<i64>,
    counter: u64,
    price_version: u64,
    snapshots: Vec<AccountSnapshot>,
    ledger_dirty: bool,
    step: u64,
    hasher: Sha256,
    recent: VecDeque<String>,
    report: Report,
}

fn key(text: &str) -> IdempotencyKey {
    IdempotencyKey::new(text).unwrap_or_else(|e| panic!("simulator key {text:?}: {e}"))
}

fn feature(name: &str) -> FeatureKey {
    FeatureKey::new(name).unwrap_or_else(|e| panic!("feature {name:?}: {e}"))
}

fn credits(micros: i64) -> Credits {
    Credits::from_micros(micros)
}

/// The ledger's id for the spend acknowledged under `key` in `region`.
fn debit_id(region: &RegionId, key_text: &str) -> Result<DebitId, String> {
    let key = IdempotencyKey::new(key_text).map_err(|e| e.to_string())?;
    tollgate_authority::reconciler::debit_id(region, &key).map_err(|e| e.to_string())
}

fn authority_settings() -> AuthoritySettings {
    AuthoritySettings {
        allocation_micros_min: 20 * MICROS,
        allocation_micros_max: 200 * MICROS,
        low_water_percent: 50,
        idle_ms: 10 * 60_000,
        watermark_lateness_ms: 60_000,
        ..AuthoritySettings::default()
    }
}

/// A directory for the SQLite files: memory-backed when the machine has one, so fsyncs are
/// cheap and hundreds of seeds fit in a test run.
fn scratch_dir() -> std::io::Result<tempfile::TempDir> {
    let shm = std::path::Path::new("/dev/shm");
    if shm.is_dir() {
        if let Ok(dir) = tempfile::Builder::new()
            .prefix("tollgate-sim")
            .tempdir_in(shm)
        {
            return Ok(dir);
        }
    }
    tempfile::Builder::new().prefix("tollgate-sim").tempdir()
}

/// Lets background tasks the engines spawned (lease refills) run to completion. They touch
/// only the in-memory store, which never waits, so each finishes within one poll; yielding in
/// a current-thread runtime runs them in spawn order, so the interleaving is a function of the
/// seed alone.
async fn quiesce() {
    for _ in 0..3 {
        tokio::task::yield_now().await;
    }
}

impl Sim {
    pub async fn new(cfg: Config) -> Result<Sim, String> {
        let dir = scratch_dir().map_err(|e| format!("scratch directory: {e}"))?;
        let ledger = Arc::new(
            SqliteLedger::open(&dir.path().join("ledger.db"))
                .await
                .map_err(|e| format!("ledger: {e}"))?,
        );
        let state_url = format!(
            "sqlite://{}?mode=rwc",
            dir.path().join("authority.db").display()
        );
        let clock = Arc::new(VirtualClock(AtomicI64::new(START_MS)));
        let region_ids: Vec<RegionId> = (0..cfg.regions)
            .map(|n| RegionId::new(format!("r{n}")).map_err(|e| e.to_string()))
            .collect::<Result<_, _>>()?;
        let stores: Vec<Arc<FaultyRegion>> = region_ids
            .iter()
            .map(|_| Arc::new(FaultyRegion::new(RETAIN_MS)))
            .collect();
        let node = Self::authority(&ledger, &state_url, &region_ids, &stores, &clock).await?;
        let link = Arc::new(AuthorityLink::new(Arc::clone(&node)));
        let regions = cfg.regions;
        let mut sim = Sim {
            rng: Rng::new(cfg.seed),
            cfg,
            clock,
            _dir: dir,
            ledger,
            state_url,
            region_ids,
            stores,
            node,
            link,
            cut_until: 0,
            edges: Vec::new(),
            next_uid: 0,
            accounts: Vec::new(),
            shadows: Vec::new(),
            acks: BTreeMap::new(),
            ack_order: Vec::new(),
            acked: Vec::new(),
            unanswered: Vec::new(),
            unbilled: BTreeSet::new(),
            debited_seen: Vec::new(),
            parked: BTreeSet::new(),
            unanswered_ids: BTreeSet::new(),
            retries: VecDeque::new(),
            debit_faults_mark: 0,
            requests: VecDeque::new(),
            holds: VecDeque::new(),
            down_until: vec![0; regions],
            delayed_until: vec![0; regions],
            last_down_ms: vec![i64::MIN; regions],
            counter: 0,
            price_version: 0,
            snapshots: Vec::new(),
            ledger_dirty: true,
            step: 0,
            hasher: Sha256::new(),
            recent: VecDeque::new(),
            report: Report::default(),
        };
        sim.report.seed = sim.cfg.seed;
        sim.report.regions = sim.cfg.regions;
        sim.setup().await?;
        Ok(sim)
    }

    async fn authority(
        ledger: &Arc<SqliteLedger>,
        state_url: &str,
        region_ids: &[RegionId],
        stores: &[Arc<FaultyRegion>],
        clock: &Arc<VirtualClock>,
    ) -> Result<Arc<Node>, String> {
        let state = StateStore::connect(state_url)
            .await
            .map_err(|e| format!("state: {e}"))?;
        let regions = region_ids
            .iter()
            .cloned()
            .zip(stores.iter().cloned())
            .collect();
        let clock: Arc<dyn tollgate_authority::Clock> = clock.clone();
        Ok(Arc::new(Authority::new(
            Arc::clone(ledger),
            state,
            regions,
            clock,
            authority_settings(),
        )))
    }

    async fn setup(&mut self) -> Result<(), String> {
        for name in ["gen", "lookup"] {
            self.node
                .define_feature(&Feature {
                    feature: feature(name),
                    unit: "call".into(),
                    description: String::new(),
                })
                .await
                .map_err(|e| format!("define feature: {e}"))?;
        }
        self.publish_prices().await?;
        for region in 0..self.cfg.regions {
            for n in 0..self.cfg.edges_per_region {
                let mode = if n % 2 == 0 {
                    EnforcementMode::Strict
                } else {
                    EnforcementMode::Cached
                };
                self.add_edge(region, mode).await;
            }
        }
        for _ in 0..2 {
            self.create_account().await?;
        }
        self.refresh_snapshots().await?;
        Ok(())
    }

    async fn publish_prices(&mut self) -> Result<String, String> {
        self.price_version += 1;
        let gen = ["0.5", "1", "1.5", "2"][self.rng.below(4) as usize];
        let lookup = ["0.25", "1"][self.rng.below(2) as usize];
        let rate = |text: &str| Rate::parse(text).map_err(|e| e.to_string());
        let version = PriceBookVersion {
            version: self.price_version,
            effective_from: self.clock.at(),
            default: [
                (feature("gen"), rate(gen)?),
                (feature("lookup"), rate(lookup)?),
            ]
            .into(),
            ..PriceBookVersion::default()
        };
        match self.node.publish_price_version(&version).await {
            Ok(()) => Ok(format!("v{} gen={gen} lookup={lookup}", self.price_version)),
            Err(e) => self.tolerate("publish prices", e),
        }
    }

    async fn add_edge(&mut self, region: usize, mode: EnforcementMode) {
        let uid = self.next_uid;
        self.next_uid += 1;
        let mut settings = EdgeSettings::new(self.region_ids[region].clone());
        settings.node_id = Some(format!("sim{uid}"));
        // Named here, not counted by the process: tests run several simulations at once.
        settings.lease_id = Some(
            LeaseId::new(format!("edge.{}.sim{uid}", self.region_ids[region]))
                .unwrap_or_else(|_| unreachable!("region ids and numbers make lease ids")),
        );
        settings.flush_interval_ms = FLUSH_INTERVAL_MS as u64;
        settings.lease_credits = credits(10 * MICROS);
        settings.reverse_window_ms = REVERSE_WINDOW_MS;
        // Live edges answer a recall at once (the recall listener runs while the deciding edge
        // waits); only a crashed edge's lease makes a decision wait it out, in real time.
        settings.recall_wait_ms = RECALL_WAIT_MS;
        let clock: Arc<dyn tollgate_edge::Clock> = self.clock.clone();
        // The edge asks the authority on the cold path, as every deployed edge does.
        let allocator = RegionAllocator {
            link: Arc::clone(&self.link),
            region: self.region_ids[region].clone(),
            faults: self.cfg.faults,
        };
        let store = self.stores[region].handle();
        let engine =
            Engine::new(Arc::clone(&store), settings, clock).with_allocator(Arc::new(allocator));
        // The price book is loaded at start; a failure (region down) is retried on first use.
        let _ = engine.catalogue().reload_prices(store.as_ref()).await;
        let recall_listener = Listener(engine.leases().spawn_recall_listener());
        self.edges.push(EdgeSlot {
            uid,
            region,
            mode,
            engine,
            store,
            cut_until: 0,
            last_cut_ms: i64::MIN,
            long_cut: false,
            unflushed: Vec::new(),
            lost_entries_seen: 0,
            _recall_listener: recall_listener,
        });
    }

    fn next(&mut self, prefix: &str) -> String {
        self.counter += 1;
        format!("{prefix}{}", self.counter)
    }

    fn any_down(&self) -> bool {
        self.stores.iter().any(|s| s.is_down())
    }

    /// An authority call failed. With faults on, a failing region call is an expected outcome
    /// (the work is redone later: intents, redelivery); anything else is a failure.
    fn tolerate(&self, what: &str, error: AuthorityError) -> Step {
        match &error {
            AuthorityError::Region { .. } if self.cfg.faults => {
                Ok(format!("{what} failed: {error}"))
            }
            _ => Err(format!("{what}: {error}")),
        }
    }

    // ---- Operations ------------------------------------------------------------------------

    async fn create_account(&mut self) -> Step {
        if self.accounts.len() >= self.cfg.accounts_max {
            return Ok("skipped (enough accounts)".into());
        }
        let n = self.accounts.len();
        let id = AccountId::new(format!("acct{n}")).map_err(|e| e.to_string())?;
        let overdraft = if self.rng.chance(40) {
            self.rng.range(1, 20) * MICROS
        } else {
            0
        };
        self.ledger
            .create_account(
                CreateAccount {
                    key: key(&format!("create.{id}")),
                    account: id.clone(),
                    overdraft_limit: credits(overdraft),
                    metadata: Metadata::default(),
                },
                self.clock.at(),
            )
            .await
            .map_err(|e| format!("create account: {e}"))?;
        self.acked.push((0, 0));
        self.unanswered.push(0);
        self.debited_seen.push(0);
        self.shadows.push(ShadowAccount::new(credits(overdraft)));
        self.accounts.push(AccountSim {
            id,
            overdraft_micros: overdraft,
            granted_micros: 0,
            admin_refunded_micros: 0,
        });
        self.snapshots.clear();
        self.ledger_dirty = true;
        let grant = self.grant_to(n).await?;
        Ok(format!("acct{n} overdraft={}; {grant}", credits(overdraft)))
    }

    async fn grant(&mut self) -> Step {
        let Some(account) = self.rng.pick(&self.accounts) else {
            return Ok("no account".into());
        };
        self.grant_to(account).await
    }

    /// How many grants of `account` hold credits in the ledger.
    async fn live_grants(&self, account: usize) -> Result<usize, String> {
        let grants = self
            .ledger
            .grants_with_credits(&self.accounts[account].id, LIVE_GRANTS_MAX)
            .await
            .map_err(|e| format!("grants with credits: {e}"))?;
        Ok(grants.len())
    }

    async fn grant_to(&mut self, account: usize) -> Step {
        // A grant has an instant of its own: a decision at the same millisecond would be
        // before or after it depending on the order two stores saw them in, and the model
        // and the ledger could then settle debt differently, both rightly.
        self.advance(1).await?;
        let amount = self.rng.range(10, 200) * MICROS;
        let now = self.clock.ms();
        let expires_at = if self.rng.chance(50) {
            Some(
                Timestamp::from_millis(now + self.rng.range(1_000, 30 * 60_000))
                    .map_err(|e| e.to_string())?,
            )
        } else if self.live_grants(account).await? >= LIVE_GRANTS_MAX {
            Some(Timestamp::from_millis(now + CROWDED_GRANT_MS).map_err(|e| e.to_string())?)
        } else {
            None
        };
        let scope = if self.rng.chance(20) {
            Scope::Features([feature("gen")].into())
        } else {
            Scope::All
        };
        let source = if self.rng.chance(50) {
            GrantSource::Purchase
        } else {
            GrantSource::Promo
        };
        let id = self.next("g");
        let command = IssueGrant {
            key: key(&format!("grant.{id}")),
            account: self.accounts[account].id.clone(),
            terms: GrantTerms {
                expires_at,
                scope,
                ..GrantTerms::new(
                    GrantId::new(id.clone()).map_err(|e| e.to_string())?,
                    credits(amount),
                    source,
                )
            },
            metadata: Metadata::default(),
            memo: Memo::default(),
        };
        let replay = self.rng.chance(20);
        let sends = if replay { 2 } else { 1 };
        for send in 0..sends {
            let receipt = self
                .ledger
                .issue_grant(command.clone(), self.clock.at())
                .await
                .map_err(|e| format!("issue grant: {e}"))?
                .map_err(|r| format!("grant refused: {}", r.message))?;
            if receipt.replayed != (send == 1) {
                return Err(format!(
                    "grant {id} send {send}: replayed = {}",
                    receipt.replayed
                ));
            }
        }
        self.accounts[account].granted_micros += amount;
        let issued_at = self.clock.at();
        self.shadows[account].grant(command.terms.grant_at(issued_at), issued_at);
        self.ledger_dirty = true;
        let rebalance = match self.node.rebalance(&self.accounts[account].id).await {
            Ok(()) => "rebalanced".to_owned(),
            Err(e) => self.tolerate("rebalance", e)?,
        };
        self.advance(1).await?;
        Ok(format!(
            "{id} acct{account} {} expires={:?} sends={sends}; {rebalance}",
            credits(amount),
            expires_at.map(|t| t.millis() - now)
        ))
    }

    async fn allocate(&mut self) -> Step {
        let Some(account) = self.rng.pick(&self.accounts) else {
            return Ok("no account".into());
        };
        let region = self.rng.below(self.cfg.regions as u64) as usize;
        match self
            .node
            .request_allocation(
                &self.region_ids[region],
                &self.accounts[account].id,
                None,
                Credits::ZERO,
            )
            .await
        {
            Ok(outcome) => Ok(format!(
                "r{region} acct{account}: {}",
                match outcome {
                    tollgate_authority::allocator::AllocationOutcome::Allocated(a) =>
                        format!("segments={} room={}", a.segments.len(), a.overdraft_room),
                    tollgate_authority::allocator::AllocationOutcome::UnknownAccount =>
                        "unknown".into(),
                }
            )),
            Err(e) => self.tolerate("allocate", e),
        }
    }

    /// An edge call failed. Unavailable is an expected answer while its region is down, or
    /// when the authority it asked failed (`authority_failed`: see `authority_failed_since`).
    fn engine_error(&self, edge: usize, error: EngineError, authority_failed: bool) -> Step {
        let down = self.stores[self.edges[edge].region].is_down();
        match error {
            EngineError::Unavailable(_) if down => Ok("unavailable (region down)".into()),
            EngineError::Unavailable(_) if self.edges[edge].store.is_partitioned() => {
                Ok("unavailable (edge partitioned from its region)".into())
            }
            EngineError::Unavailable(_) if self.debit_faults_fired() > self.debit_faults_mark => {
                Ok("unavailable (debit answer lost or late, or a settlement late)".into())
            }
            EngineError::Unavailable(_) if authority_failed || self.link.is_cut() => {
                Ok("unavailable (authority unreachable)".into())
            }
            other => Err(format!("edge {}: {other}", self.edges[edge].uid)),
        }
    }

    /// Debit faults fired so far in every region.
    fn debit_faults_fired(&self) -> u64 {
        self.stores.iter().map(|s| s.debit_faults_fired()).sum()
    }

    /// Whether a request of an edge to the authority failed during a call that began when the
    /// link had counted `failures_before` failed requests (a decision that did not ask, the
    /// authority having said "nothing more" just before, is not one the link explains).
    fn authority_failed_since(&self, failures_before: u64) -> bool {
        self.link.failures() > failures_before
    }

    /// Records an acknowledged spend. Returns whether it is a new charge (first acknowledged,
    /// or made again after it was lost with a crashed edge) rather than a replay.
    fn record_ack(
        &mut self,
        edge: usize,
        account: usize,
        key: &str,
        cost: i64,
        cached: bool,
        capture: bool,
    ) -> Result<bool, String> {
        let region = self.edges[edge].region;
        let uid = self.edges[edge].uid;
        let now = self.clock.ms();
        let debit_id = debit_id(&self.region_ids[region], key)?.to_string();
        let id = (region, key.to_owned());
        let mut charged = false;
        if !self.acks.contains_key(&id) {
            charged = true;
            self.acks.insert(
                id.clone(),
                Ack {
                    account,
                    cost,
                    at_ms: now,
                    debit_id,
                    durable: false,
                    on_edges: Vec::new(),
                    lost: false,
                    capture,
                    reversed: false,
                    admin_refunded: 0,
                    answered: true,
                    in_ledger: false,
                    parked: false,
                },
            );
            self.ack_order.push(id.clone());
            self.acked[account].0 += cost;
            self.unbilled.insert(id.clone());
        }
        let entry = self.acks.get_mut(&id).ok_or("acknowledged key vanished")?;
        if entry.cost != cost || entry.account != account {
            return Err(format!(
                "key {key} acknowledged twice with different terms: {} then {cost}",
                entry.cost
            ));
        }
        if !entry.answered {
            // A client retry of a debit the region applied while its answer was lost: the
            // same spend, served now (the model has it since it was applied).
            entry.answered = true;
            self.acked[account].0 += cost;
            self.unanswered[account] -= cost;
            self.unanswered_ids.remove(&id);
        }
        if entry.lost {
            // A client retried a decision whose first acknowledgement died unflushed with its
            // edge: the region never saw it, so the retry is decided anew and charged once.
            entry.lost = false;
            charged = true;
            self.acked[account].0 += cost;
            self.unbilled.insert(id.clone());
            self.report.lost_crash_entries -= 1;
            self.report.lost_crash_micros -= cost;
            self.report.lost_then_retried += 1;
        }
        if cached {
            if !entry.on_edges.contains(&uid) {
                entry.on_edges.push(uid);
            }
            // A replay answered from the lease is the same pending decision, decided earlier.
            let unflushed = &mut self.edges[edge].unflushed;
            if !entry.durable && !unflushed.iter().any(|(k, _)| k == key) {
                unflushed.push((key.to_owned(), now));
            }
        } else {
            entry.durable = true;
        }
        Ok(charged)
    }

    fn pick_edge(&mut self) -> usize {
        self.rng.below(self.edges.len() as u64) as usize
    }

    async fn debit(&mut self) -> Step {
        let Some(account) = self.rng.pick(&self.accounts) else {
            return Ok("no account".into());
        };
        let edge = self.pick_edge();
        let region = self.edges[edge].region;
        let k = self.next("d");
        let feature_name = if self.rng.chance(70) { "gen" } else { "lookup" };
        let spend = if self.rng.chance(50) {
            let units = self.rng.range(1, 12);
            Spend::Quantity(Quantity::parse(&units.to_string()).map_err(|e| e.to_string())?)
        } else {
            Spend::Cost(credits(self.rng.range(1, 8_000_000)))
        };
        let fired = self.debit_faults_fired();
        let outcome = self
            .send_debit(edge, account, &k, feature_name, spend)
            .await?;
        if !outcome.1 && self.debit_faults_fired() > fired {
            // The client saw an error and sends the same request again under the same key: a
            // named cost a while later on any edge, or at once on the same edge. A quantity is
            // priced by the edge that gets it, and another edge of the region may hold another
            // price book version: the region would then answer the retry as a different
            // request under a used key (a conflict; see docs/simulation.md).
            let retry = Retry {
                region,
                account,
                key: k.clone(),
                feature: feature_name,
                spend,
            };
            let later = matches!(spend, Spend::Cost(_)) && self.rng.chance(50);
            let retried = if later {
                self.retries.push_back(retry);
                "the client retries later".to_owned()
            } else {
                self.client_retry(retry, Some(edge)).await?
            };
            return Ok(format!(
                "e{} acct{account} {k}: {}; {retried}",
                self.edges[edge].uid, outcome.0
            ));
        }
        if let (Spend::Cost(cost), true) = (spend, outcome.1) {
            self.requests.push_back(Request {
                region,
                account,
                key: k.clone(),
                feature: feature_name,
                cost,
                at_ms: self.clock.ms(),
            });
            if self.requests.len() > REMEMBERED_MAX {
                self.requests.pop_front();
            }
        }
        Ok(format!(
            "e{} acct{account} {k}: {}",
            self.edges[edge].uid, outcome.0
        ))
    }

    /// A client retry: the same request again, on the same or another edge of its region.
    async fn replay_debit(&mut self) -> Step {
        if !self.retries.is_empty() && self.rng.chance(50) {
            if let Some(retry) = self.retries.pop_front() {
                return self.client_retry(retry, None).await;
            }
        }
        let now = self.clock.ms();
        let Some(i) = self.rng.pick(self.requests.make_contiguous()) else {
            return Ok("nothing to replay".into());
        };
        let request = self.requests[i].clone();
        if now - request.at_ms > REPLAY_AGE_MS_MAX {
            return Ok("too old to replay".into());
        }
        let candidates: Vec<usize> = (0..self.edges.len())
            .filter(|&e| self.edges[e].region == request.region)
            .collect();
        let edge = candidates[self.rng.below(candidates.len() as u64) as usize];
        let outcome = self
            .send_debit(
                edge,
                request.account,
                &request.key,
                request.feature,
                Spend::Cost(request.cost),
            )
            .await?;
        Ok(format!(
            "e{} replay {}: {}",
            self.edges[edge].uid, request.key, outcome.0
        ))
    }

    /// A client sends a debit again after an injected debit fault, on `edge` or any edge of
    /// its region. Failing again (a fault, a partition, the region down), it stays to be
    /// retried later.
    async fn client_retry(&mut self, retry: Retry, edge: Option<usize>) -> Step {
        let candidates: Vec<usize> = (0..self.edges.len())
            .filter(|&e| self.edges[e].region == retry.region)
            .collect();
        let edge =
            edge.unwrap_or_else(|| candidates[self.rng.below(candidates.len() as u64) as usize]);
        self.report.client_retries += 1;
        let fired = self.debit_faults_fired();
        let (text, done) = self
            .send_debit(edge, retry.account, &retry.key, retry.feature, retry.spend)
            .await?;
        self.collect_answers_lost()?;
        let failed = !done
            && (self.debit_faults_fired() > fired
                || self.edges[edge].store.is_partitioned()
                || self.stores[retry.region].is_down());
        let key = retry.key.clone();
        if failed {
            self.retries.push_back(retry);
        }
        Ok(format!(
            "client retry of {key} on e{}: {text}",
            self.edges[edge].uid
        ))
    }

    /// Debits the regions applied whose answer was lost: spends no caller was told of yet,
    /// in the region and on their way to the ledger. The model takes each at its event time
    /// with the region's draws.
    fn collect_answers_lost(&mut self) -> Result<(), String> {
        for region in 0..self.stores.len() {
            for lost in self.stores[region].take_answers_lost() {
                self.answer_lost(region, lost)?;
            }
        }
        Ok(())
    }

    fn answer_lost(&mut self, region: usize, lost: AnswerLost) -> Result<(), String> {
        let key_text = lost.key.as_str().to_owned();
        let id = (region, key_text.clone());
        if self.acks.contains_key(&id) {
            // Served before: a lease's direct charge of a cached decision, or a retry
            // answered before this late copy was applied.
            return Ok(());
        }
        let Some(account) = self.accounts.iter().position(|a| a.id == lost.account) else {
            return Err(format!(
                "r{region} applied {key_text} for an unknown account"
            ));
        };
        let debit_id = debit_id(&self.region_ids[region], &key_text)?;
        let cost = lost.cost.micros();
        self.acks.insert(
            id.clone(),
            Ack {
                account,
                cost,
                at_ms: lost.at.millis(),
                debit_id: debit_id.to_string(),
                durable: true,
                on_edges: Vec::new(),
                lost: false,
                capture: false,
                reversed: false,
                admin_refunded: 0,
                answered: false,
                in_ledger: false,
                parked: false,
            },
        );
        self.ack_order.push(id.clone());
        self.unanswered[account] += cost;
        self.unanswered_ids.insert(id.clone());
        self.unbilled.insert(id.clone());
        self.report.answers_lost += 1;
        let drawn = tollgate_core::BurnPlan {
            draws: lost.draws,
            overdraft: lost.overdraft,
        };
        let applied =
            self.shadows[account].debit((id, debit_id), lost.feature, lost.cost, drawn, lost.at);
        self.model_applied_unanswered(applied);
        Ok(())
    }

    /// Returns a description and whether the debit was acknowledged.
    async fn send_debit(
        &mut self,
        edge: usize,
        account: usize,
        k: &str,
        feature_name: &str,
        spend: Spend,
    ) -> Result<(String, bool), String> {
        let request = DebitRequest {
            account: self.accounts[account].id.clone(),
            key: key(k),
            feature: feature(feature_name),
            spend,
            actor: None,
            mode: Some(self.edges[edge].mode),
            event_time: None,
        };
        let kind = match self.edges[edge].mode {
            EnforcementMode::Strict => DecisionKind::DebitStrict,
            EnforcementMode::Cached => DecisionKind::DebitCached,
        };
        // A retry of a spend acknowledged before (and not lost) is not a new question.
        let retry = self
            .acks
            .get(&(self.edges[edge].region, k.to_owned()))
            .is_some_and(|a| !a.lost);
        let failures_before = self.link.failures();
        self.debit_faults_mark = self.debit_faults_fired();
        let result = self.edges[edge].engine.debit(request).await;
        quiesce().await;
        self.collect_answers_lost()?;
        let authority_failed = self.authority_failed_since(failures_before);
        match result {
            Ok(Decision::Done(done)) => {
                let cached = done.mode == EnforcementMode::Cached;
                let cost = done.priced.cost;
                if self.record_ack(edge, account, k, cost.micros(), cached, false)? {
                    let decision = Decided {
                        edge,
                        account,
                        kind,
                        feature: feature_name,
                    };
                    self.judge_debit(&decision, k, &done).await;
                }
                self.report.acknowledged += 1;
                Ok((
                    format!("done {cost} {:?} replayed={}", done.mode, done.replayed),
                    true,
                ))
            }
            Ok(Decision::Refused(refused)) => {
                let decision = Decided {
                    edge,
                    account,
                    kind,
                    feature: feature_name,
                };
                let refusal = Refusal {
                    refused: &refused,
                    retry,
                    authority_failed,
                };
                self.judge_refusal(&decision, &refusal).await?;
                Ok((format!("refused {}", describe(&refused)), false))
            }
            Err(e) => Ok((
                self.engine_error(edge, e, authority_failed)
                    .map_err(|m| format!("{k}: {m}"))?,
                false,
            )),
        }
    }

    async fn authorize(&mut self) -> Step {
        let Some(account) = self.rng.pick(&self.accounts) else {
            return Ok("no account".into());
        };
        let edge = self.pick_edge();
        let region = self.edges[edge].region;
        let k = self.next("a");
        let cost = self.rng.range(1, 10) * MICROS;
        let ttl_ms = self.rng.range(1_000, 120_000);
        let request = AuthorizeRequest {
            account: self.accounts[account].id.clone(),
            key: key(&k),
            feature: feature("gen"),
            spend: Spend::Cost(credits(cost)),
            ttl_ms,
            actor: None,
        };
        let failures_before = self.link.failures();
        let result = self.edges[edge].engine.authorize(request).await;
        quiesce().await;
        let authority_failed = self.authority_failed_since(failures_before);
        let decision = Decided {
            edge,
            account,
            kind: DecisionKind::Authorize,
            feature: "gen",
        };
        match result {
            Ok(Decision::Done(held)) => {
                if !held.replayed {
                    self.judge_hold(&decision, &held);
                }
                self.holds.push_back(HoldSim {
                    region,
                    account,
                    hold_id: held.hold_id,
                    amount: cost,
                    expires_ms: held.expires_at.millis(),
                    open: true,
                });
                if self.holds.len() > REMEMBERED_MAX {
                    self.holds.pop_front();
                }
                Ok(format!(
                    "{k} acct{account} held {} ttl={ttl_ms}",
                    credits(cost)
                ))
            }
            Ok(Decision::Refused(r)) => {
                let refusal = Refusal {
                    refused: &r,
                    retry: false,
                    authority_failed,
                };
                self.judge_refusal(&decision, &refusal).await?;
                Ok(format!("{k} refused {}", describe(&r)))
            }
            Err(e) => self.engine_error(edge, e, authority_failed),
        }
    }

    /// Captures or releases an open hold from any edge of its region.
    async fn end_hold(&mut self, capture: bool) -> Step {
        let open: Vec<usize> = (0..self.holds.len())
            .filter(|&i| self.holds[i].open)
            .collect();
        let Some(pick) = self.rng.pick(&open) else {
            return Ok("no open hold".into());
        };
        let i = open[pick];
        let (region, account, hold_id, amount, expires_ms) = {
            let h = &self.holds[i];
            (
                h.region,
                h.account,
                h.hold_id.clone(),
                h.amount,
                h.expires_ms,
            )
        };
        let candidates: Vec<usize> = (0..self.edges.len())
            .filter(|&e| self.edges[e].region == region)
            .collect();
        let edge = candidates[self.rng.below(candidates.len() as u64) as usize];
        let k = self.next(if capture { "c" } else { "rl" });
        let now = self.clock.ms();
        let id = self.accounts[account].id.clone();
        if capture {
            let want = match self.rng.below(4) {
                0 => None,
                1 => Some(amount + MICROS),
                _ => Some(self.rng.range(0, amount)),
            };
            let result = self.edges[edge]
                .engine
                .capture(id, key(&k), hold_id, want.map(credits))
                .await;
            quiesce().await;
            match result {
                Ok(Decision::Done(done)) => {
                    self.holds[i].open = false;
                    if now >= expires_ms {
                        return Err(format!("{k}: captured a hold past its expiry"));
                    }
                    if want.is_some_and(|w| w > amount) {
                        return Err(format!("{k}: captured more than held"));
                    }
                    if done.captured.micros() + done.released.micros() != amount {
                        return Err(format!(
                            "{k}: captured {} + released {} != held {}",
                            done.captured,
                            done.released,
                            credits(amount)
                        ));
                    }
                    if done.captured.is_positive() {
                        self.record_ack(edge, account, &k, done.captured.micros(), false, true)?;
                        self.report.acknowledged += 1;
                    }
                    let hold = self.holds[i].hold_id.clone();
                    let (ack, at) = ((region, k.clone()), self.clock.at());
                    let captured = done.captured;
                    let shadow = &mut self.shadows[account];
                    let charge = (ack, debit_id(&self.region_ids[region], &k)?);
                    let applied = shadow.capture(hold, captured, charge, feature("gen"), at);
                    self.model_applied(applied);
                    Ok(format!("{k} captured {}", done.captured))
                }
                Ok(Decision::Refused(r)) => {
                    if let Refused::Hold(HoldRefusal::Expired | HoldRefusal::UnknownHold) = r {
                        self.holds[i].open = false;
                    }
                    Ok(format!("{k} refused {}", describe(&r)))
                }
                Err(e) => self.engine_error(edge, e, false),
            }
        } else {
            let result = self.edges[edge].engine.release(id, key(&k), hold_id).await;
            quiesce().await;
            match result {
                Ok(Decision::Done(amount_back)) => {
                    self.holds[i].open = false;
                    let at = self.clock.at();
                    let applied = self.shadows[account].release(self.holds[i].hold_id.clone(), at);
                    self.model_applied(applied);
                    Ok(format!("{k} released {amount_back}"))
                }
                Ok(Decision::Refused(r)) => {
                    if let Refused::Hold(HoldRefusal::Expired | HoldRefusal::UnknownHold) = r {
                        self.holds[i].open = false;
                    }
                    Ok(format!("{k} refused {}", describe(&r)))
                }
                Err(e) => self.engine_error(edge, e, false),
            }
        }
    }

    /// A caller undoes its own debit within the window.
    async fn reverse(&mut self) -> Step {
        let now = self.clock.ms();
        let candidates: Vec<(usize, String)> = self
            .ack_order
            .iter()
            .rev()
            .take(50)
            .filter(|id| {
                let a = &self.acks[*id];
                !a.lost
                    && a.answered
                    && !a.capture
                    && !a.reversed
                    && a.admin_refunded == 0
                    && now - a.at_ms < REVERSE_WINDOW_MS
            })
            .cloned()
            .collect();
        let Some(pick) = self.rng.pick(&candidates) else {
            return Ok("nothing to reverse".into());
        };
        let (region, debit_key) = candidates[pick].clone();
        let edges: Vec<usize> = (0..self.edges.len())
            .filter(|&e| self.edges[e].region == region)
            .collect();
        let edge = edges[self.rng.below(edges.len() as u64) as usize];
        let account = self.acks[&(region, debit_key.clone())].account;
        let k = self.next("rv");
        let result = self.edges[edge]
            .engine
            .reverse(self.accounts[account].id.clone(), key(&k), key(&debit_key))
            .await;
        quiesce().await;
        // The edge flushed its buffer for the account first.
        self.after_flush(edge, Some(account));
        let ack = self
            .acks
            .get_mut(&(region, debit_key.clone()))
            .ok_or("reversed key vanished")?;
        match result {
            Ok(Decision::Done(amount)) => {
                if amount.micros() != ack.cost {
                    return Err(format!(
                        "{k}: reversed {amount} of {debit_key}, which cost {}",
                        credits(ack.cost)
                    ));
                }
                if !ack.durable {
                    return Err(format!(
                        "{k}: reversed {debit_key}, which never reached the region"
                    ));
                }
                ack.reversed = true;
                self.acked[account].1 += amount.micros();
                self.report.reversals += 1;
                let at = self.clock.at();
                let applied =
                    self.shadows[account].refund(&(region, debit_key.clone()), amount, at);
                self.model_applied(applied);
                Ok(format!("{k} reversed {debit_key} {amount}"))
            }
            Ok(Decision::Refused(Refused::Reverse(ReverseRefusal::UnknownDebit)))
                if !ack.durable =>
            {
                Ok(format!("{k} {debit_key} not in the region yet"))
            }
            Ok(Decision::Refused(r)) => Err(format!(
                "{k}: reversing {debit_key} (durable={}) refused: {}",
                ack.durable,
                describe(&r)
            )),
            // The debit still waits on this edge (its flush, or its direct charge, did not go
            // through): the reversal asks the client to retry.
            Err(EngineError::Unavailable(_))
                if self.edges[edge]
                    .engine
                    .leases()
                    .is_unflushed(&self.accounts[account].id, &key(&debit_key)) =>
            {
                Ok(format!(
                    "{k} {debit_key} still waits on the edge; the client retries later"
                ))
            }
            Err(e) => self.engine_error(edge, e, false),
        }
    }

    /// An operator refunds part of a reconciled debit older than the reverse window.
    async fn admin_refund(&mut self) -> Step {
        let now = self.clock.ms();
        // Old enough that no caller can reverse it any more: sample among those.
        let old = self
            .ack_order
            .partition_point(|id| now - self.acks[id].at_ms > REVERSE_WINDOW_MS + 1_000);
        let mut candidates: Vec<(usize, String)> = Vec::new();
        for _ in 0..if old == 0 { 0 } else { 20 } {
            let id = &self.ack_order[self.rng.below(old as u64) as usize];
            let a = &self.acks[id];
            if !a.lost && a.answered && !a.reversed && a.durable && a.admin_refunded < a.cost {
                candidates.push(id.clone());
            }
        }
        let Some(pick) = self.rng.pick(&candidates) else {
            return Ok("nothing to refund".into());
        };
        let id = candidates[pick].clone();
        let (account, left, debit_id) = {
            let a = &self.acks[&id];
            (a.account, a.cost - a.admin_refunded, a.debit_id.clone())
        };
        let amount = self.rng.range(1, left);
        let k = self.next("ar");
        let command = Refund {
            key: key(&k),
            account: self.accounts[account].id.clone(),
            debit: DebitId::new(debit_id).map_err(|e| e.to_string())?,
            amount: credits(amount),
            refund_grant_id: None,
            refund_grant_expires_at: None,
            memo: Memo::default(),
        };
        match self.ledger.refund(command, self.clock.at()).await {
            Ok(Ok(_receipt)) => {
                self.ledger_dirty = true;
                if let Some(a) = self.acks.get_mut(&id) {
                    a.admin_refunded += amount;
                }
                self.accounts[account].admin_refunded_micros += amount;
                self.report.admin_refunds += 1;
                let at = self.clock.at();
                let applied = self.shadows[account].refund(&id, credits(amount), at);
                self.model_applied(applied);
                let rebalance = match self.node.rebalance(&self.accounts[account].id).await {
                    Ok(()) => "rebalanced".to_owned(),
                    Err(e) => self.tolerate("rebalance", e)?,
                };
                Ok(format!(
                    "{k} refunded {} of {}; {rebalance}",
                    credits(amount),
                    id.1
                ))
            }
            Ok(Err(refusal)) => Err(format!(
                "{k}: refund of {} refused: {}",
                id.1, refusal.message
            )),
            Err(LedgerError::UnknownDebit { .. }) => Ok(format!("{k} {} not reconciled yet", id.1)),
            Err(e) => Err(format!("{k}: refund: {e}")),
        }
    }

    async fn reload_prices(&mut self) -> Step {
        let edge = self.pick_edge();
        match self.edges[edge]
            .engine
            .catalogue()
            .reload_prices(self.edges[edge].store.as_ref())
            .await
        {
            Ok(()) => Ok(format!(
                "e{} generation {}",
                self.edges[edge].uid,
                self.edges[edge].engine.catalogue().price_generation()
            )),
            Err(e) => self.engine_error(edge, e, false),
        }
    }

    async fn reconcile(&mut self) -> Step {
        let region = self.rng.below(self.cfg.regions as u64) as usize;
        if self.step < self.delayed_until[region] {
            return Ok(format!("r{region} delayed"));
        }
        self.ledger_dirty = true;
        match self.node.reconcile_once(&self.region_ids[region]).await {
            Ok(report) => {
                if report.parked > 0 {
                    return Err(format!("r{region}: {} usage records parked", report.parked));
                }
                self.report.charged += report.applied as u64;
                Ok(format!(
                    "r{region} records={} applied={} duplicates={} reversed={}",
                    report.records, report.applied, report.duplicates, report.reversed
                ))
            }
            Err(e) => self.tolerate("reconcile", e),
        }
    }

    async fn tick(&mut self) -> Step {
        self.ledger_dirty = true;
        let recovered = match self.node.recover_installs().await {
            Ok(n) => format!("recovered={n}"),
            Err(e) => self.tolerate("recover installs", e)?,
        };
        match self.node.tick().await {
            Ok(r) => Ok(format!(
                "{recovered} expired={} deferred={} swept={} taken_back={}",
                r.grants_expired, r.deferred, r.accounts_swept, r.allocations_taken_back
            )),
            Err(e) => Ok(format!("{recovered}; {}", self.tolerate("tick", e)?)),
        }
    }

    // ---- Time --------------------------------------------------------------------------------

    /// Flushes an edge (its flusher's tick) and records what became durable.
    async fn flush_edge(&mut self, edge: usize) {
        self.edges[edge].engine.leases().flush_dirty().await;
        quiesce().await;
        self.after_flush(edge, None);
    }

    /// After a flush: with nothing pending, every unflushed decision of the edge (or of one
    /// account) reached the region.
    fn after_flush(&mut self, edge: usize, account: Option<usize>) {
        let slot = &mut self.edges[edge];
        let lost_now = slot
            .engine
            .leases()
            .stats()
            .lost_entries
            .load(Ordering::Relaxed);
        if lost_now != slot.lost_entries_seen {
            // Counted and checked at the end: these keys are missing from the ledger.
            self.report.lost_edge_entries += lost_now - slot.lost_entries_seen;
            slot.lost_entries_seen = lost_now;
        }
        let region = slot.region;
        let flushed_all = slot.engine.leases().pending() == 0;
        let account_id = account.map(|a| self.accounts[a].id.clone());
        let down = self.stores[region].is_down() || slot.store.is_partitioned();
        let uid = slot.uid;
        let mut keep = Vec::new();
        for (k, at) in std::mem::take(&mut slot.unflushed) {
            let Some(ack) = self.acks.get_mut(&(region, k.clone())) else {
                continue;
            };
            let of_account = account.is_none_or(|a| a == ack.account);
            let flushed = flushed_all || (!down && of_account && account_id.is_some());
            if flushed {
                ack.durable = true;
                ack.on_edges.retain(|&u| u != uid);
            } else {
                keep.push((k, at));
            }
        }
        self.edges[edge].unflushed = keep;
    }

    /// Any edge may have flushed an account during another edge's decision (it gave its lease
    /// back on a recall): a decision no longer pending on its edge reached the region.
    fn note_flushed_everywhere(&mut self) {
        for slot in &mut self.edges {
            let leases = slot.engine.leases();
            let region = slot.region;
            let uid = slot.uid;
            slot.unflushed.retain(|(k, _)| {
                let Some(ack) = self.acks.get_mut(&(region, k.clone())) else {
                    return false;
                };
                if leases.pending_of(&self.accounts[ack.account].id) > 0 {
                    return true;
                }
                ack.durable = true;
                ack.on_edges.retain(|&u| u != uid);
                false
            });
        }
    }

    async fn advance(&mut self, dt: i64) -> Step {
        let target = self.clock.ms() + dt;
        for _ in 0..ADVANCE_ITERATIONS_MAX {
            for edge in 0..self.edges.len() {
                self.flush_edge(edge).await;
            }
            let now = self.clock.ms();
            if now >= target {
                return Ok(format!("+{dt}ms"));
            }
            // A partitioned edge cannot flush: its decisions wait for the partition to heal.
            let pending = self
                .edges
                .iter()
                .any(|e| !e.store.is_partitioned() && e.engine.leases().pending() > 0);
            let leased = self
                .edges
                .iter()
                .any(|e| self.accounts.iter().any(|a| e.engine.leases().holds(&a.id)));
            let step = if pending {
                FLUSH_INTERVAL_MS
            } else if leased {
                MAINTENANCE_MS - now.rem_euclid(MAINTENANCE_MS)
            } else {
                target - now
            };
            let next = (now + step).min(target);
            self.clock.set_ms(next);
            if next / MAINTENANCE_MS != now / MAINTENANCE_MS {
                for edge in 0..self.edges.len() {
                    self.edges[edge].engine.leases().maintain().await;
                    quiesce().await;
                    self.after_flush(edge, None);
                }
            }
        }
        Err(format!("advancing {dt} ms did not finish"))
    }

    // ---- Faults ------------------------------------------------------------------------------

    /// An edge process dies: its unflushed cached decisions are gone, its lease stays in the
    /// region until it expires. A new edge takes its place.
    async fn crash_edge(&mut self) -> Step {
        let edge = self.pick_edge();
        let slot = self.edges.remove(edge);
        let now = self.clock.ms();
        let mut lost = 0;
        let mut lost_micros = 0;
        for (k, at) in &slot.unflushed {
            let Some(ack) = self.acks.get_mut(&(slot.region, k.clone())) else {
                continue;
            };
            ack.on_edges.retain(|&u| u != slot.uid);
            if ack.durable || !ack.on_edges.is_empty() {
                continue;
            }
            // The bound: what a crash loses was decided within one flush interval, unless the
            // region was down since (then the edge could not flush, and kept it).
            if now - at > FLUSH_INTERVAL_MS
                && self.last_down_ms[slot.region] < *at
                && slot.last_cut_ms < *at
            {
                return Err(format!(
                    "edge {} lost {k}, decided {} ms before the crash with the region up and reachable",
                    slot.uid,
                    now - at
                ));
            }
            ack.lost = true;
            self.unbilled.remove(&(slot.region, k.clone()));
            self.acked[ack.account].0 -= ack.cost;
            if !self.shadows[ack.account].lose(&(slot.region, k.clone())) {
                return Err(format!("the model had no spend {k} that could be lost"));
            }
            lost += 1;
            lost_micros += ack.cost;
        }
        self.report.lost_crash_entries += lost;
        self.report.lost_crash_micros += lost_micros;
        let (region, mode, uid) = (slot.region, slot.mode, slot.uid);
        drop(slot);
        self.add_edge(region, mode).await;
        Ok(format!(
            "edge {uid} (r{region} {mode:?}) crashed, lost {lost} decisions ({})",
            credits(lost_micros)
        ))
    }

    async fn restart_authority(&mut self, why: &str) -> Step {
        self.node = Self::authority(
            &self.ledger,
            &self.state_url,
            &self.region_ids,
            &self.stores,
            &self.clock,
        )
        .await?;
        self.link.replace(Arc::clone(&self.node));
        self.ledger_dirty = true;
        match self.node.recover_installs().await {
            Ok(n) => Ok(format!(
                "authority restarted ({why}), {n} installs recovered"
            )),
            Err(e) => self.tolerate("recover installs", e),
        }
    }

    /// The authority applies a batch and dies before acknowledging it: the batch is delivered
    /// again to the new authority, and must change nothing the second time.
    async fn crash_mid_reconcile(&mut self) -> Step {
        let region = self.rng.below(self.cfg.regions as u64) as usize;
        let batch = match self.node.read_usage(&self.region_ids[region]).await {
            Ok(batch) => batch,
            Err(e) => return self.tolerate("read usage", e),
        };
        self.ledger_dirty = true;
        let applied = match self.node.apply_usage(&batch).await {
            Ok(report) => {
                if report.parked > 0 {
                    return Err(format!("r{region}: {} usage records parked", report.parked));
                }
                self.report.charged += report.applied as u64;
                format!("applied {} of {}", report.applied, report.records)
            }
            Err(e) => self.tolerate("apply usage", e)?,
        };
        let restarted = self
            .restart_authority("crashed before acknowledging")
            .await?;
        Ok(format!("r{region} {applied}; {restarted}"))
    }

    async fn fault(&mut self) -> Step {
        let region = self.rng.below(self.cfg.regions as u64) as usize;
        let (kind, text) = match self.rng.below(11) {
            0 => ("edge_crash", self.crash_edge().await?),
            1 if self.step >= self.down_until[region] => {
                let steps = self.rng.range(2, 10) as u64;
                self.down_until[region] = self.step + steps;
                self.stores[region].set_down(true);
                ("redis_restart", format!("r{region} down for {steps} steps"))
            }
            2 => {
                let steps = self.rng.range(5, 60) as u64;
                self.delayed_until[region] = self.step + steps;
                (
                    "reconcile_delayed",
                    format!("r{region} not reconciled for {steps} steps"),
                )
            }
            3 => {
                let fault = [
                    InstallFault::Lost,
                    InstallFault::ReplyLost,
                    InstallFault::Duplicated,
                ][self.rng.below(3) as usize];
                self.stores[region].arm_install(fault);
                let kind = match fault {
                    InstallFault::Lost => "install_lost",
                    InstallFault::ReplyLost => "install_reply_lost",
                    InstallFault::Duplicated => "install_duplicated",
                };
                (kind, format!("r{region} next install {fault:?}"))
            }
            4 if self.rng.below(2) == 0 => {
                self.stores[region].arm_ack_lost();
                ("ack_lost", format!("r{region} next acknowledgement lost"))
            }
            4 => {
                self.stores[region].arm_settle_reply_lost();
                (
                    "settle_reply_lost",
                    format!("r{region} next lease settlement applied, its reply lost"),
                )
            }
            5 => (
                "authority_restart",
                self.restart_authority("restart").await?,
            ),
            6 if self.step >= self.cut_until => {
                let steps = self.rng.range(2, 20) as u64;
                self.cut_until = self.step + steps;
                self.link.set_cut(true);
                (
                    "authority_unreachable",
                    format!("edges cannot reach the authority for {steps} steps"),
                )
            }
            8 => {
                let edge = self.pick_edge();
                let steps = self.rng.range(2, 20) as u64;
                // One partition in three is long: the clock moves on as usual meanwhile, so the
                // edge's lease passes its deadline and expires in the region while its
                // decisions wait to be flushed.
                let long = self.rng.below(3) == 0;
                let slot = &mut self.edges[edge];
                slot.cut_until = slot.cut_until.max(self.step + steps);
                slot.long_cut = slot.long_cut || long;
                slot.store.set_partitioned(true);
                (
                    if long {
                        "edge_partitioned_long"
                    } else {
                        "edge_partitioned"
                    },
                    format!(
                        "edge {} (r{} {:?}) cut off from its region for {steps} steps{}",
                        slot.uid,
                        slot.region,
                        slot.mode,
                        if long { ", the clock running" } else { "" }
                    ),
                )
            }
            9 => {
                self.stores[region].arm_debit(DebitFault::AnswerLost);
                (
                    "debit_answer_lost",
                    format!("r{region} next debit applied, its answer lost"),
                )
            }
            10 if self.rng.below(2) == 0 => {
                self.stores[region].arm_debit(DebitFault::Slow);
                (
                    "debit_slow",
                    format!("r{region} next debit answers after the edge's store timeout"),
                )
            }
            10 => {
                self.stores[region].arm_settle_slow();
                (
                    "settle_slow",
                    format!(
                        "r{region} next lease settlement answers after the edge's store timeout"
                    ),
                )
            }
            _ => (
                "authority_crash_mid_batch",
                self.crash_mid_reconcile().await?,
            ),
        };
        *self.report.faults.entry(kind).or_default() += 1;
        Ok(format!("FAULT {kind}: {text}"))
    }

    // ---- Steps -------------------------------------------------------------------------------

    pub async fn step(&mut self) -> Result<(), Failure> {
        let step = self.step;
        // Regions come back when their restart is over.
        for r in 0..self.cfg.regions {
            if self.stores[r].is_down() {
                self.last_down_ms[r] = self.clock.ms();
                if step >= self.down_until[r] {
                    self.stores[r].set_down(false);
                }
            }
        }
        if self.link.is_cut() && step >= self.cut_until {
            self.link.set_cut(false);
        }
        // Partitioned edges heal when their partition is over.
        let now = self.clock.ms();
        for slot in &mut self.edges {
            if slot.store.is_partitioned() {
                slot.last_cut_ms = now;
                if step >= slot.cut_until {
                    slot.store.set_partitioned(false);
                    slot.long_cut = false;
                }
            }
        }
        self.debit_faults_mark = self.debit_faults_fired();
        let roll = self.rng.below(1_000);
        let started = Instant::now();
        // A restart, and a short partition, are short: the clock moves in small steps
        // meanwhile, so a partitioned edge's lease never passes its deadline; during a long
        // partition it runs as usual (see docs/simulation.md).
        let down = self.any_down()
            || self
                .edges
                .iter()
                .any(|e| e.store.is_partitioned() && !e.long_cut);
        let (name, result): (&'static str, Step) = match roll {
            _ if !self.cfg.faults && roll >= 960 => ("advance_small", self.advance(5).await),
            0..=279 => ("debit", self.debit().await),
            280..=339 => ("replay_debit", self.replay_debit().await),
            340..=399 => ("authorize", self.authorize().await),
            400..=449 => ("capture", self.end_hold(true).await),
            450..=469 => ("release", self.end_hold(false).await),
            470..=499 => ("reverse", self.reverse().await),
            500..=519 => ("admin_refund", self.admin_refund().await),
            520..=559 => ("grant", self.grant().await),
            560..=569 => ("create_account", self.create_account().await),
            570..=599 => ("allocate", self.allocate().await),
            600..=709 => ("reconcile", self.reconcile().await),
            710..=739 => ("tick", self.tick().await),
            740..=749 => ("publish_prices", self.publish_prices().await),
            750..=769 => ("reload_prices", self.reload_prices().await),
            770..=879 => {
                let dt = self.rng.range(1, 40);
                ("advance_small", self.advance(dt).await)
            }
            880..=929 => {
                // While a region is down, time moves in small steps only (a restart is short).
                let dt = if down {
                    self.rng.range(1, 50)
                } else {
                    self.rng.range(100, 5_000)
                };
                ("advance_medium", self.advance(dt).await)
            }
            930..=959 => {
                let dt = if down {
                    self.rng.range(1, 50)
                } else {
                    self.rng.range(30_000, 20 * 60_000)
                };
                ("advance_large", self.advance(dt).await)
            }
            _ => ("fault", self.fault().await),
        };
        *self.report.ops.entry(name).or_default() += 1;
        self.timed(name, started);
        self.note_flushed_everywhere();
        // A slow debit may have been applied during any call of the step.
        let result = match self.collect_answers_lost() {
            Ok(()) => result,
            Err(message) => Err(message),
        };
        let line = match &result {
            Ok(text) => format!("{step} t={} {name}: {text}", self.clock.ms() - START_MS),
            Err(text) => format!(
                "{step} t={} {name}: ERROR {text}",
                self.clock.ms() - START_MS
            ),
        };
        self.trace(line);
        if let Err(message) = result {
            return Err(self.failure(message));
        }
        if let Some(error) = self.link.take_unexplained().into_iter().next() {
            return Err(self.failure(format!("an edge's request to the authority: {error}")));
        }
        let started = Instant::now();
        self.fold_shadows();
        self.timed("check: model", started);
        if let Err(message) = self.check().await {
            return Err(self.failure(message));
        }
        if self.cfg.verify_every > 0 && (step + 1).is_multiple_of(self.cfg.verify_every) {
            let started = Instant::now();
            if let Err(message) = self.deep_check(false).await {
                return Err(self.failure(message));
            }
            self.timed("check: full verification", started);
        }
        self.step += 1;
        Ok(())
    }

    fn timed(&mut self, what: &'static str, started: Instant) {
        *self.report.seconds.entry(what).or_default() += started.elapsed().as_secs_f64();
    }

    fn trace(&mut self, line: String) {
        if self.cfg.print_trace {
            println!("{line}");
        }
        self.hasher.update(line.as_bytes());
        self.hasher.update(b"\n");
        if self.recent.len() >= RECENT_LINES {
            self.recent.pop_front();
        }
        self.recent.push_back(line);
    }

    fn failure(&self, message: String) -> Failure {
        Failure {
            seed: self.cfg.seed,
            step: self.step,
            message,
            recent: self.recent.iter().cloned().collect(),
        }
    }

    // ---- Checks ------------------------------------------------------------------------------

    async fn refresh_snapshots(&mut self) -> Result<(), String> {
        if !self.ledger_dirty && self.snapshots.len() == self.accounts.len() {
            return Ok(());
        }
        let mut snapshots = Vec::with_capacity(self.accounts.len());
        for account in &self.accounts {
            snapshots.push(
                self.ledger
                    .account(&account.id)
                    .await
                    .map_err(|e| format!("read {}: {e}", account.id))?,
            );
        }
        self.snapshots = snapshots;
        self.ledger_dirty = false;
        Ok(())
    }

    /// Per account: (acknowledged spends, of which reversed), not counting lost ones.
    fn acknowledged(&self) -> Vec<(i64, i64)> {
        self.acked.clone()
    }

    /// After every step.
    async fn check(&mut self) -> Result<(), String> {
        for (r, store) in self.stores.iter().enumerate() {
            if let Some(v) = store.take_violations().into_iter().next() {
                return Err(format!("r{r}: {v}"));
            }
        }
        let started = Instant::now();
        self.refresh_snapshots().await?;
        let acked = self.acknowledged();
        let mut checks = 0;
        for (n, (account, snap)) in self.accounts.iter().zip(&self.snapshots).enumerate() {
            let t = &snap.totals;
            let expected = t.expected_balance().map_err(|e| e.to_string())?;
            if expected != snap.balance {
                return Err(format!(
                    "acct{n}: balance equation: totals say {expected}, balance is {}",
                    snap.balance
                ));
            }
            if snap.balance.micros() < -account.overdraft_micros {
                return Err(format!(
                    "acct{n}: ledger balance {} below the overdraft limit {}",
                    snap.balance,
                    credits(account.overdraft_micros)
                ));
            }
            if t.granted.micros() != account.granted_micros {
                return Err(format!(
                    "acct{n}: ledger granted {} but the simulation granted {}",
                    t.granted,
                    credits(account.granted_micros)
                ));
            }
            let (gross, reversed) = acked[n];
            // Debits applied with their answer lost reach the ledger too (a retry answers
            // them later, charged once).
            let gross = gross + self.unanswered[n];
            let reversal_refunds = t.refunded.micros() - account.admin_refunded_micros;
            if t.debited.micros() > gross {
                return Err(format!(
                    "acct{n}: ledger debited {} but only {} was acknowledged or applied (double charge?)",
                    t.debited,
                    credits(gross)
                ));
            }
            if reversal_refunds > reversed {
                return Err(format!(
                    "acct{n}: ledger refunded {} for reversals but only {} was reversed",
                    credits(reversal_refunds),
                    credits(reversed)
                ));
            }
            // The balance once every acknowledged spend and reversal is reconciled.
            let projected = snap.balance.micros() - (gross - t.debited.micros())
                + (reversed - reversal_refunds);
            if projected < -account.overdraft_micros {
                return Err(format!(
                    "acct{n}: overspend: acknowledged spends take the balance to {}, below -{}",
                    credits(projected),
                    credits(account.overdraft_micros)
                ));
            }
            checks += 5;
        }
        self.timed("check: ledger", started);
        let started = Instant::now();
        if !self.any_down() {
            checks += self.check_regions(&acked).await?;
        }
        self.timed("check: regions", started);
        let started = Instant::now();
        checks += self.check_served().await?;
        self.timed("check: served", started);
        self.report.checks += checks;
        Ok(())
    }

    /// Nothing served goes unbilled, per account and to the micro-credit:
    /// `served = charged + parked + pending` (see docs/simulation.md, invariant 8):
    ///
    /// - served: the spends callers were told are done (debits and positive captures, each
    ///   key once; cached decisions lost with a crashed edge excluded, as stated);
    /// - charged: the ledger's `debited`, less the debits it took that no caller was told of
    ///   yet (applied in a region with their answer lost);
    /// - parked: the authority's open parked records of served spends;
    /// - pending: served spends on their way: held unflushed (or unbilled) by a live edge, or
    ///   in their region and not reconciled yet — which the region's usage stream must then
    ///   still hold.
    async fn check_served(&mut self) -> Result<u64, String> {
        self.find_billed().await?;
        let mut parts = vec![ServedParts::default(); self.accounts.len()];
        let mut region_needed = vec![false; self.stores.len()];
        let mut unanswered_charged = vec![0_i64; self.accounts.len()];
        for id in &self.unbilled {
            let a = &self.acks[id];
            if !a.answered {
                continue;
            }
            if a.durable {
                parts[a.account].pending_region += a.cost;
                region_needed[id.0] = true;
            } else {
                parts[a.account].pending_edges += a.cost;
            }
        }
        for id in &self.parked {
            let a = &self.acks[id];
            if a.answered {
                parts[a.account].parked += a.cost;
            }
        }
        for id in &self.unanswered_ids {
            let a = &self.acks[id];
            if a.in_ledger {
                unanswered_charged[a.account] += a.cost;
            }
        }
        for (r, needed) in region_needed.into_iter().enumerate() {
            if !needed {
                continue;
            }
            let backlog = self.stores[r]
                .backlog()
                .await
                .map_err(|e| format!("r{r} backlog: {e}"))?;
            if backlog.is_some_and(|b| b.records == 0) {
                let missing: Vec<&str> = self
                    .unbilled
                    .iter()
                    .filter(|id| id.0 == r && self.acks[*id].durable)
                    .map(|id| id.1.as_str())
                    .take(8)
                    .collect();
                return Err(format!(
                    "served spends {missing:?} reached r{r} and left its usage stream, yet are neither in the ledger nor parked"
                ));
            }
        }
        for (n, p) in parts.iter_mut().enumerate() {
            p.served = self.acked[n].0;
            p.charged = self.snapshots[n].totals.debited.micros() - unanswered_charged[n];
            let billed = p.charged + p.parked + p.pending_edges + p.pending_region;
            if p.served != billed {
                return Err(format!(
                    "acct{n}: served {} but charged {} + parked {} + pending {} ({} on edges, {} in the region) = {}",
                    credits(p.served),
                    credits(p.charged),
                    credits(p.parked),
                    credits(p.pending_edges + p.pending_region),
                    credits(p.pending_edges),
                    credits(p.pending_region),
                    credits(billed)
                ));
            }
        }
        self.report.served_checks += parts.len() as u64;
        Ok(parts.len() as u64)
    }

    /// Finds which spends on their way reached the ledger (looked up by debit id when the
    /// account's `debited` moved) or were parked by the authority.
    async fn find_billed(&mut self) -> Result<(), String> {
        let (open, _) = self
            .node
            .state()
            .parked_open_totals()
            .await
            .map_err(|e| format!("parked: {e}"))?;
        if open > 0 {
            self.find_parked().await?;
        }
        for n in 0..self.accounts.len() {
            let debited = self.snapshots[n].totals.debited.micros();
            if debited == self.debited_seen[n] {
                continue;
            }
            let ids: Vec<(usize, String)> = self
                .unbilled
                .iter()
                .filter(|id| self.acks[*id].account == n)
                .cloned()
                .collect();
            for id in ids {
                let debit =
                    DebitId::new(self.acks[&id].debit_id.clone()).map_err(|e| e.to_string())?;
                let filter = EntryFilter {
                    kinds: vec![EntryKind::Debit],
                    debit: Some(debit),
                    ..EntryFilter::account(self.accounts[n].id.clone())
                };
                let page = self
                    .ledger
                    .entries(
                        &filter,
                        PageRequest {
                            size: 1,
                            token: None,
                        },
                    )
                    .await
                    .map_err(|e| format!("ledger entries: {e}"))?;
                if !page.items.is_empty() {
                    self.unbilled.remove(&id);
                    if let Some(a) = self.acks.get_mut(&id) {
                        a.in_ledger = true;
                    }
                }
            }
            self.debited_seen[n] = debited;
        }
        Ok(())
    }

    async fn find_parked(&mut self) -> Result<(), String> {
        let mut after = 0;
        for _ in 0..10_000 {
            let rows = self
                .node
                .state()
                .parked_after(after, "", ParkedFilter::Open, PARKED_PAGE_MAX)
                .await
                .map_err(|e| format!("parked: {e}"))?;
            let Some(last) = rows.last() else {
                return Ok(());
            };
            after = last.id;
            for row in &rows {
                let Some(region) = self
                    .region_ids
                    .iter()
                    .position(|r| r.as_str() == row.parked.region)
                else {
                    continue;
                };
                let id = (region, row.parked.key.clone());
                if let Some(a) = self.acks.get_mut(&id) {
                    if !a.in_ledger && !a.parked {
                        a.parked = true;
                        self.unbilled.remove(&id);
                        self.parked.insert(id);
                    }
                }
            }
        }
        Ok(())
    }

    /// What the regions hold of an account (active segments, holds, what edges can still spend
    /// of their leases) never exceeds what
    /// the ledger's grants still hold less what was spent and not reconciled yet, plus the
    /// overdraft limit.
    async fn check_regions(&self, acked: &[(i64, i64)]) -> Result<u64, String> {
        let now = self.clock.at();
        let mut checks = 0;
        for (n, (account, snap)) in self.accounts.iter().zip(&self.snapshots).enumerate() {
            let mut held = 0;
            let mut seen = Vec::new();
            for (r, store) in self.stores.iter().enumerate() {
                let view = store
                    .view(&account.id, now)
                    .await
                    .map_err(|e| format!("r{r} view: {e}"))?;
                seen.push(format!(
                    "r{r}: {} segment(s) {:?}, held {} on {:?}, overdraft {} used of {}",
                    view.segments.len(),
                    view.segments
                        .iter()
                        .map(|s| (s.grant_id.to_string(), s.remaining))
                        .collect::<Vec<_>>(),
                    view.held,
                    view.held_grants,
                    view.overdraft_used,
                    view.overdraft_limit
                ));
                let active: i64 = view
                    .segments
                    .iter()
                    .filter(|s| s.is_active_at(now))
                    .map(|s| s.remaining.micros())
                    .sum();
                held += active + view.held.micros();
            }
            // What live edges can still spend from their leases (the region's lease record
            // still counts what they spent and have not flushed). A crashed edge's lease is
            // out of reach until it expires and its credits are back in the segments.
            held += self
                .edges
                .iter()
                .map(|e| e.engine.leases().available(&account.id, None, now).micros())
                .sum::<i64>();
            let (gross, reversed) = acked[n];
            let gross = gross + self.unanswered[n];
            let t = &snap.totals;
            let reversal_refunds = t.refunded.micros() - account.admin_refunded_micros;
            let unreconciled = (gross - t.debited.micros()) - (reversed - reversal_refunds);
            let remaining = snap.balance.micros() + snap.debt.micros();
            let bound = remaining - unreconciled + account.overdraft_micros;
            let exposed = self.exposed_by_partitions(n);
            if held > bound + exposed {
                return Err(format!(
                    "acct{n}: regions hold {} but the ledger leaves {} (remaining {}, unreconciled {}, overdraft {}; decisions of partitioned edges not settled {})",
                    credits(held),
                    credits(bound),
                    credits(remaining),
                    credits(unreconciled),
                    credits(account.overdraft_micros),
                    credits(exposed)
                ) + &format!("; {}", seen.join("; ")));
            }
            checks += 1;
        }
        Ok(checks)
    }

    /// The cached decisions of the account that edges made before they were cut off from
    /// their region and have not settled since: when the region takes such an edge's lease
    /// back (at its expiry), their credits are back in the segments although they were
    /// spent — the overspend docs/answer.md bounds ("The cached-mode bound", `U(e,a)`).
    fn exposed_by_partitions(&self, account: usize) -> i64 {
        self.edges
            .iter()
            .filter(|e| e.last_cut_ms != i64::MIN)
            .flat_map(|e| {
                e.unflushed
                    .iter()
                    .filter(move |(_, at)| *at <= e.last_cut_ms)
                    .map(move |(k, _)| (e.region, k))
            })
            .filter_map(|(region, k)| self.acks.get(&(region, k.clone())))
            .filter(|a| a.account == account && !a.durable && !a.lost)
            .map(|a| a.cost)
            .sum()
    }

    /// Every N steps and at the end: `verify` (hash chains, the balance equation, every grant)
    /// and the ledger's debits key by key against what was acknowledged. `exact` (at the end,
    /// everything reconciled): nothing acknowledged is missing.
    async fn deep_check(&mut self, exact: bool) -> Result<(), String> {
        let report = self
            .ledger
            .verify(None)
            .await
            .map_err(|e| format!("verify: {e}"))?;
        if !report.is_clean() {
            return Err(format!("verify: {:?}", report.problems));
        }
        self.report.verifies += 1;
        let parked = self
            .node
            .state()
            .parked_count()
            .await
            .map_err(|e| format!("parked: {e}"))?;
        if parked != 0 {
            return Err(format!("{parked} usage records parked"));
        }
        let by_id: BTreeMap<&str, &Ack> = self
            .acks
            .values()
            .map(|a| (a.debit_id.as_str(), a))
            .collect();
        let mut seen = 0usize;
        let mut token = None;
        for _ in 0..100_000 {
            let page = self
                .ledger
                .debits(
                    &DebitQuery {
                        account: None,
                        from: Timestamp::EPOCH,
                        until: Timestamp::MAX,
                    },
                    PageRequest {
                        size: PAGE_SIZE_MAX,
                        token: token.take(),
                    },
                )
                .await
                .map_err(|e| format!("debits: {e}"))?;
            for row in &page.items {
                let Some(ack) = by_id.get(row.debit_id.as_str()) else {
                    return Err(format!(
                        "ledger debit {} was never acknowledged",
                        row.debit_id
                    ));
                };
                if ack.lost {
                    return Err(format!("ledger debit {} was counted lost", row.debit_id));
                }
                if row.amount.micros() != ack.cost {
                    return Err(format!(
                        "ledger debit {} is {} but {} was acknowledged",
                        row.debit_id,
                        row.amount,
                        credits(ack.cost)
                    ));
                }
                let refunded = if ack.reversed { ack.cost } else { 0 } + ack.admin_refunded;
                let ok = if exact {
                    row.refunded.micros() == refunded
                } else {
                    row.refunded.micros() <= refunded
                };
                if !ok {
                    return Err(format!(
                        "ledger debit {} refunded {} but {} was reversed or refunded",
                        row.debit_id,
                        row.refunded,
                        credits(refunded)
                    ));
                }
                seen += 1;
            }
            token = page.next_token;
            if token.is_none() {
                break;
            }
        }
        self.report.checks += seen as u64 + 2;
        if exact {
            let expected = self.acks.values().filter(|a| !a.lost).count();
            let missing = expected - seen.min(expected);
            if missing as u64 != self.report.lost_edge_entries {
                return Err(format!(
                    "{missing} acknowledged spends are not in the ledger (edges counted {} lost entries)",
                    self.report.lost_edge_entries
                ));
            }
        }
        Ok(())
    }

    /// Faults stop; everything is flushed, returned and reconciled; then the exact checks.
    pub async fn finish(mut self) -> Result<Report, Failure> {
        match self.drain().await {
            Ok(()) => {}
            Err(message) => return Err(self.failure(message)),
        }
        if let Err(message) = self.final_checks().await {
            return Err(self.failure(message));
        }
        let digest = std::mem::take(&mut self.hasher).finalize();
        self.report.trace_hash = digest.iter().map(|b| format!("{b:02x}")).collect();
        self.report.steps = self.step;
        Ok(self.report)
    }

    async fn drain(&mut self) -> Result<(), String> {
        for store in &self.stores {
            store.set_down(false);
            store.disarm();
        }
        self.delayed_until.iter_mut().for_each(|d| *d = 0);
        self.link.set_cut(false);
        for slot in &mut self.edges {
            slot.store.set_partitioned(false);
            slot.long_cut = false;
            slot.cut_until = 0;
        }
        // A slow debit still on its way arrives; then clients retry every debit that failed
        // on a debit fault, each until it is answered.
        for store in &self.stores {
            store.deliver_deferred().await;
        }
        self.collect_answers_lost()?;
        for _ in 0..REMEMBERED_MAX * 4 {
            let Some(retry) = self.retries.pop_front() else {
                break;
            };
            let text = self.client_retry(retry, None).await?;
            self.trace(format!("drain: {text}"));
        }
        if let Some(id) = self.unanswered_ids.iter().next() {
            return Err(format!(
                "{} was applied in r{} with its answer lost, and no client retry was answered",
                id.1, id.0
            ));
        }
        for edge in 0..self.edges.len() {
            self.edges[edge].engine.shutdown().await;
            quiesce().await;
            self.after_flush(edge, None);
            if !self.edges[edge].unflushed.is_empty() {
                return Err(format!(
                    "edge {} still has {} unflushed decisions after shutdown",
                    self.edges[edge].uid,
                    self.edges[edge].unflushed.len()
                ));
            }
        }
        self.node
            .recover_installs()
            .await
            .map_err(|e| format!("recover installs: {e}"))?;
        self.node
            .reconcile_all(10_000)
            .await
            .map_err(|e| format!("reconcile: {e}"))?;
        // Crashed edges' leases and every hold expire; the lifecycle settles them.
        let later = self.clock.ms() + 10 * 60_000;
        self.clock.set_ms(later);
        self.node.tick().await.map_err(|e| format!("tick: {e}"))?;
        self.node
            .reconcile_all(10_000)
            .await
            .map_err(|e| format!("reconcile: {e}"))?;
        self.ledger_dirty = true;
        Ok(())
    }

    async fn final_checks(&mut self) -> Result<(), String> {
        self.check().await?;
        if let Some(id) = self.unbilled.iter().next() {
            return Err(format!(
                "{} spends still on their way after the drain (the first: {} in r{})",
                self.unbilled.len(),
                id.1,
                id.0
            ));
        }
        self.deep_check(true).await?;
        let acked = self.acknowledged();
        for (n, (account, snap)) in self.accounts.iter().zip(&self.snapshots).enumerate() {
            let t = &snap.totals;
            let (gross, reversed) = acked[n];
            if self.report.lost_edge_entries == 0 {
                // Exact: the ledger's balance is what was granted less every acknowledged
                // spend (lost cached usage excluded), plus reversals and refunds, less expiry.
                let expected =
                    account.granted_micros - gross + reversed + account.admin_refunded_micros
                        - t.expired.micros()
                        - t.voided.micros()
                        + t.adjusted.micros();
                if snap.balance.micros() != expected {
                    return Err(format!(
                        "acct{n}: final balance {} but grants − acknowledged + reversed + refunded − expired = {}",
                        snap.balance,
                        credits(expected)
                    ));
                }
                if t.debited.micros() != gross {
                    return Err(format!(
                        "acct{n}: ledger debited {} but {} was acknowledged",
                        t.debited,
                        credits(gross)
                    ));
                }
            }
            if t.refunded.micros() != reversed + account.admin_refunded_micros {
                return Err(format!(
                    "acct{n}: ledger refunded {} but reversals and refunds came to {}",
                    t.refunded,
                    credits(reversed + account.admin_refunded_micros)
                ));
            }
            for (r, store) in self.stores.iter().enumerate() {
                let view = store
                    .view(&account.id, self.clock.at())
                    .await
                    .map_err(|e| format!("r{r} view: {e}"))?;
                if view.leases != 0 || view.holds_pending != 0 {
                    return Err(format!(
                        "acct{n} r{r}: {} leases and {} holds left after they all expired",
                        view.leases, view.holds_pending
                    ));
                }
            }
            self.report.checks += 4;
        }
        Ok(())
    }

    pub fn report(&self) -> &Report {
        &self.report
    }
}

fn describe(refused: &Refused) -> String {
    match refused {
        Refused::Insufficient {
            cost, available, ..
        } => format!("insufficient cost={cost} available={available}"),
        other => format!("{other:?}"),
    }
}
