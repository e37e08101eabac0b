//! Cached mode: decisions from this edge's in-memory lease on each account, flushed to the
//! regional store every few milliseconds.
//!
//! Per account there are two locks. `local` (a plain mutex, never held across an await) guards
//! what this edge may still spend and the decisions not yet flushed: the hot path takes only
//! this one. `region` (an async mutex) serialises the calls that change the lease in the
//! regional store — take, settle, return — and remembers what the region's lease record holds,
//! so a top-up is added as a difference and never resurrects usage that is not flushed yet.
//!
//! Bounded error (docs/answer.md, "The cached-mode bound"): the edge decides from a lease only
//! before its *deadline*, the lease's expiry in the region as the region last confirmed it (a
//! take's answer, or a settlement it accepted) less `lease_safety_margin_ms`; at or after it a
//! cached request is decided strict. So the region never takes back a lease this edge still
//! spends from (unless a caller's clock runs more than the margin ahead of this edge's), and
//! what it can overspend is what it decided from its leases and could not settle before they
//! expired: at most their remaining amount. Decisions waiting to be flushed or charged are
//! capped per account (`pending_entries_account_max`) and per edge (`pending_entries_max`); at
//! the cap a cached request is decided strict too. A crash loses at most those decisions.
//!
//! A flush that finds its lease expired in the region charges its decisions one by one as
//! strict debits, at their event times. One the region does not charge (unreachable, or it can
//! no longer pay) is served and not charged: it waits on the edge as *unbilled*, next to the
//! account's pending buffer, and the flusher tries it again with a bounded backoff. A retry is a
//! strict debit under the same key and request, so an attempt whose reply was lost replays and
//! nothing is charged twice. One the region still refuses after `UNBILLED_FORCED_AFTER_MS` (or
//! any at shutdown) is charged *forced*: recorded in the region whatever the account holds, the
//! rest as overdraft beyond its room, so it reaches the authority, which charges it as debt or
//! parks it where an operator sees it. Served usage never stays on an edge that may restart.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use dashmap::DashMap;
use tollgate_core::grant::burn_key_order;
use tollgate_core::{
    AccountId, ActorId, Credits, Draw, FeatureKey, GrantId, IdempotencyKey, LeaseId, Scope,
    Timestamp,
};
use tollgate_region::{
    debit_fingerprint, derived_key, Change, DebitCommand, DebitOutcome, Lease, LeaseRequest,
    LeaseSettlement, LeaseUsage, PriceTag, Refusal, RegionError, RegionStore, SettleOutcome,
    SettleStatus, DERIVED_KEYS_MAX, LEASE_SETTLE_ENTRIES_MAX,
};
use tracing::{error, warn};

use crate::clock::Clock;
use crate::error::EngineError;
use crate::settings::{EdgeSettings, LEASE_RECENT_KEYS_MAX};

/// Accounts flushed at once.
const FLUSH_PARALLEL_MAX: usize = 64;
/// Characters of the host name kept in a lease id.
const HOST_IN_ID_LEN_MAX: usize = 40;
/// How often leases are checked for renewal or idleness, in milliseconds.
const MAINTENANCE_MS: u64 = 1_000;
/// Longest wait before an unbilled decision is tried again, in milliseconds. The first retry
/// waits one flush interval, and each failure doubles the wait up to this.
pub const UNBILLED_RETRY_MS_MAX: i64 = 5_000;
/// How long an unbilled decision the region refuses to charge waits for the authority to bring
/// the region credits, in milliseconds; after that (or at shutdown) it is charged forced
/// (`DebitCommand::forced`): recorded in the region as overdraft beyond its room if need be,
/// so that it reaches the authority, which charges it as debt or parks it, visibly.
pub const UNBILLED_FORCED_AFTER_MS: i64 = 10_000;
/// Unbilled decisions logged one by one at shutdown; the rest are only counted.
const UNBILLED_LOGGED_AT_SHUTDOWN_MAX: usize = 1_000;

#[derive(Clone, Debug)]
struct Slice {
    grant_id: GrantId,
    remaining: i64,
    priority: u32,
    effective_at: Timestamp,
    expires_at: Option<Timestamp>,
    scope: Scope,
}

impl Slice {
    fn eligible(&self, feature: Option<&FeatureKey>, at: Timestamp) -> bool {
        self.remaining > 0
            && self.effective_at <= at
            && self.expires_at.is_none_or(|expires_at| at < expires_at)
            && feature.is_none_or(|feature| self.scope.covers(feature))
    }
}

/// A decision remembered to answer a replay that reaches this edge again.
#[derive(Clone, Debug)]
struct Recent {
    /// The region's fingerprint of the request: a quantity is the same request whatever it
    /// was priced at, as in the region.
    fingerprint: String,
    draws: Vec<Draw>,
    overdraft: Credits,
}

/// A cached decision whose lease expired before its flush, and which a direct charge has not
/// charged yet: served to the caller, not yet in the region.
#[derive(Clone, Debug)]
struct Unbilled {
    entry: LeaseUsage,
    /// Direct charges tried and not done.
    failures: u32,
    /// Not tried again before this time (ms), unless the edge is shutting down.
    retry_at_ms: i64,
    /// When it became unbilled (ms).
    since_ms: i64,
}

/// What one direct charge did.
enum DirectCharge {
    /// Charged now, or found charged by an earlier attempt whose reply was lost.
    Charged,
    /// The region answered and did not charge: it cannot pay from its segments now.
    Refused(Refusal),
    /// The key and each derived key are remembered for other requests.
    KeysExhausted,
    /// The store failed or did not answer in time.
    Failed(String),
}

#[derive(Default)]
struct Local {
    /// Kept in burn-down order.
    slices: Vec<Slice>,
    overdraft: i64,
    pending: Vec<LeaseUsage>,
    /// Decisions of an expired lease the region has not charged yet, oldest first; retried by
    /// the flusher, and counted in `pending_total` like `pending`.
    unbilled: Vec<Unbilled>,
    recent: HashMap<IdempotencyKey, Recent>,
    recent_order: VecDeque<IdempotencyKey>,
    last_used_ms: i64,
    refill_running: bool,
    /// A refill got less than it asked for: the region is short, so do not ask again before.
    refill_quiet_until_ms: i64,
    /// No decision is made from the lease at or after this time (ms): the lease's expiry in the
    /// region as the region last confirmed it, less the safety margin. Only a take or an
    /// accepted settlement moves it, and only forward; 0 while the region confirmed none.
    deadline_ms: i64,
    /// A renewal asked for by a decision failed: decisions do not ask again before this time
    /// (ms), so a region that does not answer costs one wait per account per round, not one per
    /// request (maintenance and flushes still renew).
    renew_quiet_until_ms: i64,
    /// Being given back to the region: nothing is decided from it or added to it any more
    /// (a decision taken in between would be served from credits the region is getting back,
    /// and left pending on a lease no flush reaches).
    retired: bool,
}

impl Local {
    fn available(&self, feature: Option<&FeatureKey>, at: Timestamp) -> i64 {
        self.slices
            .iter()
            .filter(|s| s.eligible(feature, at))
            .map(|s| s.remaining)
            .sum::<i64>()
            + self.overdraft
    }

    fn remember(&mut self, key: IdempotencyKey, recent: Recent) {
        if self.recent_order.len() >= LEASE_RECENT_KEYS_MAX {
            if let Some(oldest) = self.recent_order.pop_front() {
                self.recent.remove(&oldest);
            }
        }
        self.recent_order.push_back(key.clone());
        self.recent.insert(key, recent);
    }

    /// Adds credits to a slice (a top-up, or a duplicate credited back).
    fn credit(&mut self, grant_id: &GrantId, amount: i64) {
        if let Some(slice) = self.slices.iter_mut().find(|s| s.grant_id == *grant_id) {
            slice.remaining += amount;
        }
    }

    /// Decisions waiting on this edge: pending, and unbilled.
    fn waiting(&self) -> usize {
        self.pending.len() + self.unbilled.len()
    }

    /// Moves the deadline to `expires_at_ms` (the region's expiry) less `margin_ms`, if later.
    fn confirm(&mut self, expires_at_ms: i64, margin_ms: i64) {
        self.deadline_ms = self
            .deadline_ms
            .max(expires_at_ms.saturating_sub(margin_ms));
    }

    fn sort(&mut self) {
        self.slices.sort_by(|a, b| {
            burn_key_order(
                (a.priority, a.expires_at, a.effective_at, &a.grant_id),
                (b.priority, b.expires_at, b.effective_at, &b.grant_id),
            )
        });
    }
}

/// What the region's lease record holds, as this edge last learned it.
#[derive(Default)]
struct RegionSide {
    amounts: HashMap<GrantId, i64>,
    overdraft: i64,
    /// Whether the region holds a lease for this edge at all.
    live: bool,
    /// When the region last extended the lease (a take or a settlement), in ms.
    renewed_at_ms: i64,
}

struct AccountLease {
    local: Mutex<Local>,
    region: tokio::sync::Mutex<RegionSide>,
}

impl AccountLease {
    fn local(&self) -> MutexGuard<'_, Local> {
        // The guarded state is consistent between statements, so a panic elsewhere leaves it usable.
        self.local
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// This node's lease id: unique per process and per `Leases`, since two edges sharing one
/// would share one lease record in the region.
fn node_lease_id(settings: &EdgeSettings, now: Timestamp) -> LeaseId {
    static INSTANCES: AtomicU64 = AtomicU64::new(0);
    let instance = INSTANCES.fetch_add(1, Ordering::Relaxed);
    let node = settings.node_id.clone().unwrap_or_else(|| {
        let host = std::env::var("HOSTNAME")
            .ok()
            .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
            .unwrap_or_default();
        let host: String = host.trim().chars().take(HOST_IN_ID_LEN_MAX).collect();
        format!("{host}.{}.{}", std::process::id(), now.millis())
    });
    // The unique parts come first, so a long node name can only lose its own tail.
    let text: String = format!("edge.{instance}.{}.{node}", settings.region)
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '-') {
                c
            } else {
                '_'
            }
        })
        .take(tollgate_core::ids::LEASE_ID_LEN_MAX)
        .collect();
    // Only id characters remain and the text is not empty, so this always holds.
    LeaseId::new(text).unwrap_or_else(|_| unreachable!("sanitized lease ids are valid"))
}

/// Why the lease did not decide a request that it might have paid: it is decided strict.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Declined {
    /// The lease's deadline passed (its expiry in the region, as last confirmed, less the
    /// safety margin) and a renewal did not extend it.
    DeadlinePassed,
    /// The account (`pending_entries_account_max`) or the edge (`pending_entries_max`) has as
    /// many decisions waiting to be flushed or charged as it may.
    PendingFull,
}

/// What the in-memory step found.
enum LocalStep {
    Decided(LeaseDecision),
    /// The lease cannot pay (or is retired): top it up, or let the region decide.
    CannotPay,
    Declined(Declined),
}

/// The outcome of a cached decision.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LeaseDecision {
    Allowed {
        draws: Vec<Draw>,
        overdraft: Credits,
        replayed: bool,
        available_after: Credits,
    },
    Insufficient {
        available: Credits,
    },
    /// Not decided from the lease; the caller decides strict.
    Declined(Declined),
}

/// Counters for metrics and tests.
#[derive(Debug, Default)]
pub struct LeaseStats {
    pub refills: AtomicU64,
    pub flushes: AtomicU64,
    pub flushed_entries: AtomicU64,
    pub duplicates: AtomicU64,
    /// Decisions the region rejected from a settlement: they do not fit the lease (a bug in the
    /// edge). A decision whose lease expired is never counted here: it stays unbilled until
    /// charged.
    pub lost_entries: AtomicU64,
    /// Decisions charged under a derived key: their key had been used for a different request
    /// (a reused key with another body, seen by this or another edge, or in strict mode).
    pub rekeyed: AtomicU64,
    /// Milliseconds between the oldest flushed decision and its flush, last time.
    pub flush_lag_ms: AtomicU64,
    /// Reads of an account's summary again because a decision or a view found the region at
    /// another move count than the summary it had (the engine's, counted here with the rest).
    pub summary_rereads: AtomicU64,
    /// Of those, the ones that found the summary published now still at another count: the
    /// authority moved credits and had not published yet (the balance told may be off by them).
    pub summary_behind: AtomicU64,
    /// Leases given back because another edge of the region recalled them.
    pub recalled: AtomicU64,
    /// Decisions served from a lease that expired before their flush and not charged yet: they
    /// wait on this edge and are retried (a gauge, not a counter).
    pub unbilled_decisions: AtomicU64,
    /// What those decisions cost, in micro-credits.
    pub unbilled_micros: AtomicU64,
    /// Cached requests decided strict because their lease's deadline had passed.
    pub deadline_passed: AtomicU64,
    /// Cached requests decided strict because the pending cap (account or edge) was reached.
    pub pending_cap_reached: AtomicU64,
}

pub struct Leases<S: RegionStore> {
    store: Arc<S>,
    settings: Arc<EdgeSettings>,
    clock: Arc<dyn Clock>,
    lease_id: LeaseId,
    accounts: DashMap<AccountId, Arc<AccountLease>>,
    dirty: Mutex<Vec<AccountId>>,
    pending_total: AtomicUsize,
    stopping: AtomicBool,
    stats: LeaseStats,
    seq: AtomicU64,
}

impl<S: RegionStore> Leases<S> {
    pub fn new(store: Arc<S>, settings: Arc<EdgeSettings>, clock: Arc<dyn Clock>) -> Self {
        Leases {
            lease_id: settings
                .lease_id
                .clone()
                .unwrap_or_else(|| node_lease_id(&settings, clock.now())),
            store,
            settings,
            clock,
            accounts: DashMap::new(),
            dirty: Mutex::new(Vec::new()),
            pending_total: AtomicUsize::new(0),
            stopping: AtomicBool::new(false),
            stats: LeaseStats::default(),
            seq: AtomicU64::new(0),
        }
    }

    pub fn stats(&self) -> &LeaseStats {
        &self.stats
    }

    pub fn lease_id(&self) -> &LeaseId {
        &self.lease_id
    }

    pub fn pending(&self) -> usize {
        self.pending_total.load(Ordering::Relaxed)
    }

    /// What this edge's lease can still pay for the account (on `feature` when given); nothing
    /// once the lease is past its deadline.
    pub fn available(
        &self,
        account: &AccountId,
        feature: Option<&FeatureKey>,
        at: Timestamp,
    ) -> Credits {
        self.accounts.get(account).map_or(Credits::ZERO, |lease| {
            let local = lease.local();
            // A lease past its deadline pays nothing more (this edge decides strict), and the
            // region may already have taken its credits back (an edge cut off from its region
            // past the deadline): counting them here would count them twice.
            if self.clock.now().millis() >= local.deadline_ms {
                return Credits::ZERO;
            }
            Credits::from_micros(local.available(feature, at))
        })
    }

    fn op_key(&self, what: &str) -> Result<IdempotencyKey, EngineError> {
        let n = self.seq.fetch_add(1, Ordering::Relaxed);
        IdempotencyKey::new(format!("{}.{what}.{n}", self.lease_id))
            .map_err(|e| EngineError::Internal(e.to_string()))
    }

    fn entry(&self, account: &AccountId) -> Arc<AccountLease> {
        if let Some(existing) = self.accounts.get(account) {
            return Arc::clone(&existing);
        }
        let created = Arc::new(AccountLease {
            local: Mutex::new(Local::default()),
            region: tokio::sync::Mutex::new(RegionSide::default()),
        });
        Arc::clone(
            self.accounts
                .entry(account.clone())
                .or_insert(created)
                .value(),
        )
    }

    /// What this edge has spent from its lease on the account and not yet flushed to the region
    /// (pending, or unbilled: its lease expired and the region has not charged it yet).
    pub fn unflushed(&self, account: &AccountId) -> Credits {
        self.accounts.get(account).map_or(Credits::ZERO, |lease| {
            let local = lease.local();
            let unbilled = local.unbilled.iter().map(|u| &u.entry);
            Credits::checked_sum(local.pending.iter().chain(unbilled).map(LeaseUsage::cost))
                .unwrap_or(Credits::MAX)
        })
    }

    /// Runs `read` (a read of the region) while no flush, refill or return of this edge's lease
    /// on the account is in flight, and answers it with what the edge had not flushed when it
    /// started: both then count the same decisions as spent on the lease. (A flush takes its
    /// batch out of `pending` before the region answers: read apart, the region could still count
    /// the batch on the lease while `unflushed` no longer does.) Decisions are not held back:
    /// they never take the region lock; one made meanwhile is simply not counted yet.
    pub async fn with_unflushed<T>(
        &self,
        account: &AccountId,
        read: impl std::future::Future<Output = T>,
    ) -> (Credits, T) {
        let lease = self.accounts.get(account).map(|lease| Arc::clone(&lease));
        let Some(lease) = lease else {
            return (Credits::ZERO, read.await);
        };
        let _region = lease.region.lock().await;
        (self.unflushed(account), read.await)
    }

    /// Whether a decision of this edge on the account under `key` waits to be flushed or
    /// charged (the region does not know it yet).
    pub fn is_unflushed(&self, account: &AccountId, key: &IdempotencyKey) -> bool {
        self.accounts.get(account).is_some_and(|lease| {
            let local = lease.local();
            local.pending.iter().any(|u| u.key == *key)
                || local.unbilled.iter().any(|u| u.entry.key == *key)
        })
    }

    /// How many of this edge's decisions on the account wait to be flushed or charged.
    pub fn pending_of(&self, account: &AccountId) -> usize {
        self.accounts.get(account).map_or(0, |lease| {
            let local = lease.local();
            local.pending.len() + local.unbilled.len()
        })
    }

    /// How many decisions on the account were served and wait to be charged directly, their
    /// lease having expired before their flush.
    pub fn unbilled_of(&self, account: &AccountId) -> usize {
        self.accounts
            .get(account)
            .map_or(0, |lease| lease.local().unbilled.len())
    }

    /// Whether this edge holds a lease on the account (even an empty one).
    pub fn holds(&self, account: &AccountId) -> bool {
        self.accounts.get(account).is_some_and(|lease| {
            let local = lease.local();
            !local.slices.is_empty() || local.overdraft > 0
        })
    }

    /// Takes a lease on the account in the background, unless one is being taken already.
    pub fn warm(self: &Arc<Self>, account: &AccountId) {
        let lease = self.entry(account);
        let start = {
            let mut local = lease.local();
            let start =
                !local.refill_running && self.clock.now().millis() >= local.refill_quiet_until_ms;
            if start {
                local.refill_running = true;
                local.last_used_ms = self.clock.now().millis();
            }
            start
        };
        if start {
            self.spawn_refill(account.clone(), lease);
        }
    }

    /// Decides from the lease; tops the lease up first when it cannot pay.
    #[allow(clippy::too_many_arguments)]
    pub async fn debit(
        self: &Arc<Self>,
        account: &AccountId,
        key: &IdempotencyKey,
        feature: &FeatureKey,
        cost: Credits,
        at: Timestamp,
        actor: Option<ActorId>,
        price: PriceTag,
    ) -> Result<LeaseDecision, EngineError> {
        if self.stopping.load(Ordering::Relaxed) {
            return Err(EngineError::Unavailable("edge is shutting down".into()));
        }
        let lease = self.entry(account);
        let usage = || LeaseUsage {
            key: key.clone(),
            feature: feature.clone(),
            at,
            draws: Vec::new(),
            overdraft: Credits::ZERO,
            actor: actor.clone(),
            price,
        };
        // At most one renewal and one top-up, then the answer.
        let (mut renewed, mut refilled) = (false, false);
        loop {
            match self.decide(account, &lease, usage(), cost)? {
                LocalStep::Decided(decision) => return Ok(decision),
                LocalStep::Declined(Declined::DeadlinePassed) if !renewed && !refilled => {
                    // The region may still hold the lease: a settlement it accepts extends it.
                    renewed = true;
                    self.renew(account, &lease).await;
                }
                LocalStep::Declined(why) => {
                    let counter = match why {
                        Declined::DeadlinePassed => &self.stats.deadline_passed,
                        Declined::PendingFull => &self.stats.pending_cap_reached,
                    };
                    counter.fetch_add(1, Ordering::Relaxed);
                    return Ok(LeaseDecision::Declined(why));
                }
                LocalStep::CannotPay if !refilled => {
                    // Top the lease up by at least what is missing (a take also confirms a new
                    // expiry), then decide again.
                    refilled = true;
                    let short = cost.micros() - lease.local().available(Some(feature), at);
                    let wanted =
                        Credits::from_micros(self.settings.lease_credits.micros().max(short));
                    self.refill(account, &lease, wanted).await?;
                }
                LocalStep::CannotPay => {
                    let available = lease.local().available(Some(feature), at);
                    return Ok(LeaseDecision::Insufficient {
                        available: Credits::from_micros(available),
                    });
                }
            }
        }
    }

    /// Asks the region to renew the account's lease now: settles what is pending (an accepted
    /// settlement extends the lease), or sends an empty settlement. A failure is not an error
    /// here: the deadline stays where it was, and decisions do not ask again for a while.
    async fn renew(&self, account: &AccountId, lease: &Arc<AccountLease>) {
        if self.clock.now().millis() < lease.local().renew_quiet_until_ms {
            return;
        }
        let mut region = lease.region.lock().await;
        if !region.live {
            return;
        }
        if lease.local().pending.is_empty() {
            let _ = self.settle(account, &mut region, lease, Vec::new()).await;
        } else {
            self.settle_pending(account, lease, &mut region).await;
        }
        let now_ms = self.clock.now().millis();
        let mut local = lease.local();
        if now_ms >= local.deadline_ms {
            local.renew_quiet_until_ms = now_ms + MAINTENANCE_MS as i64;
        }
    }

    /// The in-memory decision: from the lease, or why not.
    fn decide(
        self: &Arc<Self>,
        account: &AccountId,
        lease: &Arc<AccountLease>,
        mut usage: LeaseUsage,
        cost: Credits,
    ) -> Result<LocalStep, EngineError> {
        let now_ms = self.clock.now().millis();
        let mut local = lease.local();
        if local.retired {
            // The region decides (strict), with the credits this lease gave back.
            return Ok(LocalStep::CannotPay);
        }
        if let Some(recent) = local.recent.get(&usage.key) {
            // A replay moves nothing, so it is answered from memory even past the deadline.
            if recent.fingerprint != debit_fingerprint(&usage.feature, cost, &usage.price) {
                return Err(EngineError::Conflict);
            }
            let available_after = Credits::from_micros(local.available(None, usage.at));
            return Ok(LocalStep::Decided(LeaseDecision::Allowed {
                draws: recent.draws.clone(),
                overdraft: recent.overdraft,
                replayed: true,
                available_after,
            }));
        }
        if local.available(Some(&usage.feature), usage.at) < cost.micros() {
            return Ok(LocalStep::CannotPay);
        }
        if now_ms >= local.deadline_ms {
            // The region may take the lease back (its credits go back to the segments) at any
            // moment now: a decision from it could be spent twice.
            return Ok(LocalStep::Declined(Declined::DeadlinePassed));
        }
        if local.waiting() >= self.settings.pending_entries_account_max
            || self.pending_total.load(Ordering::Relaxed) >= self.settings.pending_entries_max
        {
            return Ok(LocalStep::Declined(Declined::PendingFull));
        }
        let mut left = cost.micros();
        let mut draws = Vec::new();
        for slice in local
            .slices
            .iter_mut()
            .filter(|s| s.eligible(Some(&usage.feature), usage.at))
        {
            if left == 0 {
                break;
            }
            let take = left.min(slice.remaining);
            slice.remaining -= take;
            left -= take;
            draws.push(Draw {
                grant_id: slice.grant_id.clone(),
                amount: Credits::from_micros(take),
            });
        }
        local.overdraft -= left;
        let overdraft = Credits::from_micros(left);
        usage.draws = draws.clone();
        usage.overdraft = overdraft;
        let key = usage.key.clone();
        let fingerprint = debit_fingerprint(&usage.feature, cost, &usage.price);
        let at = usage.at;
        if local.pending.is_empty() {
            self.dirty
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(account.clone());
        }
        local.pending.push(usage);
        self.pending_total.fetch_add(1, Ordering::Relaxed);
        local.remember(
            key,
            Recent {
                fingerprint,
                draws: draws.clone(),
                overdraft,
            },
        );
        local.last_used_ms = now_ms;
        let available_after = local.available(None, at);
        // Refill before it runs out: below half a lease, top up in the background.
        let low = available_after < self.settings.lease_credits.micros() / 2;
        let start_refill = low && !local.refill_running && now_ms >= local.refill_quiet_until_ms;
        if start_refill {
            local.refill_running = true;
        }
        drop(local);
        if start_refill {
            self.spawn_refill(account.clone(), Arc::clone(lease));
        }
        Ok(LocalStep::Decided(LeaseDecision::Allowed {
            draws,
            overdraft,
            replayed: false,
            available_after: Credits::from_micros(available_after),
        }))
    }

    fn spawn_refill(self: &Arc<Self>, account: AccountId, lease: Arc<AccountLease>) {
        let this = Arc::clone(self);
        tokio::spawn(async move {
            let have = lease.local().available(None, this.clock.now());
            let wanted = Credits::from_micros((this.settings.lease_credits.micros() - have).max(0));
            if let Err(error) = this.refill(&account, &lease, wanted).await {
                warn!(%account, %error, "lease refill failed");
            }
            lease.local().refill_running = false;
        });
    }

    /// Takes `wanted` more credits from the region into the lease.
    async fn refill(
        &self,
        account: &AccountId,
        lease: &Arc<AccountLease>,
        wanted: Credits,
    ) -> Result<(), EngineError> {
        if !wanted.is_positive() {
            return Ok(());
        }
        let mut region = lease.region.lock().await;
        if lease.local().retired {
            return Ok(());
        }
        let now = self.clock.now();
        let request = LeaseRequest {
            account: account.clone(),
            key: self.op_key("take")?,
            lease_id: self.lease_id.clone(),
            amount: wanted,
            now,
            expires_at: now
                .checked_add_ms(self.settings.lease_ttl_ms)
                .unwrap_or(Timestamp::MAX),
        };
        let timeout = Duration::from_millis(self.settings.store_timeout_ms);
        let granted = tokio::time::timeout(timeout, self.store.take_lease(&request))
            .await
            .map_err(|_| {
                EngineError::Unavailable(
                    "regional store did not answer the lease request in time".into(),
                )
            })??;
        self.stats.refills.fetch_add(1, Ordering::Relaxed);
        self.merge(lease, &mut region, &granted, now.millis());
        Ok(())
    }

    /// Adds what the region's lease record gained since this edge last saw it.
    fn merge(&self, lease: &AccountLease, region: &mut RegionSide, granted: &Lease, now_ms: i64) {
        let mut local = lease.local();
        for slice in &granted.slices {
            let before = region.amounts.get(&slice.grant_id).copied().unwrap_or(0);
            let delta = slice.remaining.micros() - before;
            region
                .amounts
                .insert(slice.grant_id.clone(), slice.remaining.micros());
            match local
                .slices
                .iter_mut()
                .find(|s| s.grant_id == slice.grant_id)
            {
                Some(existing) => {
                    existing.remaining += delta;
                    existing.expires_at = slice.expires_at;
                    existing.priority = slice.priority;
                    existing.scope = slice.scope.clone();
                }
                None => local.slices.push(Slice {
                    grant_id: slice.grant_id.clone(),
                    remaining: delta,
                    priority: slice.priority,
                    effective_at: slice.effective_at,
                    expires_at: slice.expires_at,
                    scope: slice.scope.clone(),
                }),
            }
        }
        local.overdraft += granted.overdraft.micros() - region.overdraft;
        region.overdraft = granted.overdraft.micros();
        region.live = true;
        region.renewed_at_ms = now_ms;
        // The region's own figure: the lease lives there until `expires_at`.
        local.confirm(
            granted.expires_at.millis(),
            self.settings.lease_safety_margin_ms(),
        );
        local.sort();
        if granted.granted.micros() < self.settings.lease_credits.micros() / 2 {
            // The region is running short: do not ask again for a while.
            local.refill_quiet_until_ms = now_ms + self.settings.lease_idle_ms.min(1_000);
        }
    }

    /// Sends the account's pending decisions to the region.
    pub async fn flush_account(&self, account: &AccountId) {
        let Some(lease) = self.accounts.get(account).map(|l| Arc::clone(&l)) else {
            return;
        };
        self.flush(account, &lease).await;
    }

    async fn flush(&self, account: &AccountId, lease: &Arc<AccountLease>) {
        let mut region = lease.region.lock().await;
        self.settle_pending(account, lease, &mut region).await;
        // Under the region lock, so two retries of one decision never run at once.
        self.retry_unbilled(account, lease).await;
        drop(region);
        if !lease.local().unbilled.is_empty() {
            // Keeps the account on the flusher's list until they are charged.
            self.mark_dirty(account);
        }
    }

    /// Settles the pending decisions, a batch at a time, until none is left or the store fails.
    async fn settle_pending(
        &self,
        account: &AccountId,
        lease: &Arc<AccountLease>,
        region: &mut RegionSide,
    ) {
        loop {
            let entries: Vec<LeaseUsage> = {
                let mut local = lease.local();
                let take = local.pending.len().min(LEASE_SETTLE_ENTRIES_MAX);
                local.pending.drain(..take).collect()
            };
            if entries.is_empty() {
                return;
            }
            let oldest = entries.iter().map(|e| e.at.millis()).min().unwrap_or(0);
            let count = entries.len();
            match self.settle(account, region, lease, entries).await {
                Ok(()) => {
                    self.pending_total.fetch_sub(count, Ordering::Relaxed);
                    self.stats.flushes.fetch_add(1, Ordering::Relaxed);
                    self.stats
                        .flushed_entries
                        .fetch_add(count as u64, Ordering::Relaxed);
                    let lag = (self.clock.now().millis() - oldest).max(0) as u64;
                    self.stats.flush_lag_ms.store(lag, Ordering::Relaxed);
                }
                Err(returned) => {
                    // The region is unreachable: keep the decisions, in order, for the next round.
                    let mut local = lease.local();
                    let newer = std::mem::take(&mut local.pending);
                    local.pending = returned;
                    local.pending.extend(newer);
                    drop(local);
                    self.mark_dirty(account);
                    return;
                }
            }
        }
    }

    fn mark_dirty(&self, account: &AccountId) {
        self.dirty
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(account.clone());
    }

    /// Settles one batch. On a store failure the batch is handed back untouched.
    async fn settle(
        &self,
        account: &AccountId,
        region: &mut RegionSide,
        lease: &AccountLease,
        entries: Vec<LeaseUsage>,
    ) -> Result<(), Vec<LeaseUsage>> {
        let now = self.clock.now();
        let settlement = LeaseSettlement {
            account: account.clone(),
            lease_id: self.lease_id.clone(),
            now,
            expires_at: now
                .checked_add_ms(self.settings.lease_ttl_ms)
                .unwrap_or(Timestamp::MAX),
            entries,
        };
        let timeout = Duration::from_millis(self.settings.store_timeout_ms);
        let outcome =
            match tokio::time::timeout(timeout, self.store.settle_lease(&settlement)).await {
                Ok(Ok(outcome)) => outcome,
                Ok(Err(error)) => {
                    warn!(%account, %error, "flush failed; will retry");
                    return Err(settlement.entries);
                }
                Err(_) => {
                    warn!(%account, "flush timed out; will retry");
                    return Err(settlement.entries);
                }
            };
        match outcome {
            SettleOutcome::Settled(statuses) => {
                region.renewed_at_ms = now.millis();
                // The region found the lease live and moved its expiry to at least this
                // settlement's (it keeps the later of the two).
                lease.local().confirm(
                    settlement.expires_at.millis(),
                    self.settings.lease_safety_margin_ms(),
                );
                for (entry, status) in settlement.entries.iter().zip(statuses) {
                    if let SettleStatus::Rekeyed { key, .. } = &status {
                        self.stats.rekeyed.fetch_add(1, Ordering::Relaxed);
                        warn!(%account, key = %entry.key, charged_as = %key, "idempotency key reused with a different request; charged under a derived key");
                    }
                    match status {
                        // Charged now, or by an earlier settlement of these very decisions whose
                        // reply was lost: either way the credits are spent.
                        SettleStatus::Recorded(_) | SettleStatus::Rekeyed { .. } => {
                            for draw in &entry.draws {
                                if let Some(amount) = region.amounts.get_mut(&draw.grant_id) {
                                    *amount -= draw.amount.micros();
                                }
                            }
                            region.overdraft -= entry.overdraft.micros();
                        }
                        SettleStatus::Duplicate => {
                            // Charged already (here or on another edge): credit it back.
                            self.stats.duplicates.fetch_add(1, Ordering::Relaxed);
                            let mut local = lease.local();
                            for draw in &entry.draws {
                                local.credit(&draw.grant_id, draw.amount.micros());
                            }
                            local.overdraft += entry.overdraft.micros();
                        }
                        SettleStatus::Rejected(why) => {
                            error!(%account, key = %entry.key, %why, "region rejected a cached decision");
                            self.stats.lost_entries.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                Ok(())
            }
            SettleOutcome::NoLease => {
                // The lease expired in the region and went back to the segments: charge these
                // decisions as strict debits under the same keys, and start a new lease later.
                warn!(%account, entries = settlement.entries.len(), "lease expired before its flush; charging directly");
                *region = RegionSide::default();
                {
                    let mut local = lease.local();
                    local.slices.clear();
                    local.overdraft = 0;
                    local.deadline_ms = 0;
                }
                let parked = settlement
                    .entries
                    .into_iter()
                    .map(|entry| Unbilled {
                        entry,
                        failures: 0,
                        retry_at_ms: now.millis(),
                        since_ms: now.millis(),
                    })
                    .collect();
                // The flush tries them right after this settlement; their failures wait.
                self.park_unbilled(lease, parked);
                Ok(())
            }
        }
    }

    /// Adds decisions to the account's unbilled list, and to the gauges.
    fn park_unbilled(&self, lease: &AccountLease, parked: Vec<Unbilled>) {
        let micros: i64 = parked.iter().map(|u| u.entry.cost().micros()).sum();
        self.pending_total
            .fetch_add(parked.len(), Ordering::Relaxed);
        self.stats
            .unbilled_decisions
            .fetch_add(parked.len() as u64, Ordering::Relaxed);
        self.stats
            .unbilled_micros
            .fetch_add(micros.max(0) as u64, Ordering::Relaxed);
        lease.local().unbilled.extend(parked);
    }

    /// Tries the account's unbilled decisions that are due (all of them when shutting down),
    /// oldest first, and stops at the first store failure: the store is likely down, and each
    /// further call would wait for its timeout. The caller holds the region lock, the only one
    /// under which the list changes, so positions stay valid across the awaits.
    async fn retry_unbilled(&self, account: &AccountId, lease: &AccountLease) {
        let stopping = self.stopping.load(Ordering::Relaxed);
        let now_ms = self.clock.now().millis();
        // (position, decision, forced): one the region has refused long enough, or any at
        // shutdown, is recorded whatever the account holds.
        let due: Vec<(usize, LeaseUsage, bool)> = lease
            .local()
            .unbilled
            .iter()
            .enumerate()
            .filter(|(_, u)| stopping || u.retry_at_ms <= now_ms)
            .map(|(i, u)| {
                let forced = stopping || now_ms - u.since_ms >= UNBILLED_FORCED_AFTER_MS;
                (i, u.entry.clone(), forced)
            })
            .collect();
        let mut charged = Vec::new();
        let mut failed = Vec::new();
        // Due decisions not tried because the store failed before them.
        let mut untried = Vec::new();
        let mut due = due.into_iter();
        for (i, entry, forced) in due.by_ref() {
            match self.charge_directly(account, &entry, forced).await {
                DirectCharge::Charged => charged.push(i),
                DirectCharge::Failed(error) => {
                    warn!(%account, key = %entry.key, %error, "direct charge of a cached decision failed; will retry");
                    failed.push(i);
                    untried.extend(due.by_ref().map(|(i, ..)| i));
                    break;
                }
                DirectCharge::Refused(refusal) => {
                    error!(%account, key = %entry.key, cost = %entry.cost(), ?refusal, "region cannot pay a served cached decision whose lease expired; kept unbilled, will retry, then record it forced");
                    failed.push(i);
                }
                DirectCharge::KeysExhausted => {
                    error!(%account, key = %entry.key, cost = %entry.cost(), "served cached decision's key and derived keys all used by other requests; kept unbilled, will retry");
                    failed.push(i);
                }
            }
        }
        let mut local = lease.local();
        let mut retry_at_ms = now_ms;
        for &i in &failed {
            let unbilled = &mut local.unbilled[i];
            unbilled.failures = unbilled.failures.saturating_add(1);
            unbilled.retry_at_ms = now_ms + self.retry_wait_ms(unbilled.failures);
            retry_at_ms = unbilled.retry_at_ms;
        }
        // They wait as long as the decision the store failed on, so a store that is down gets
        // one call per account per wait, not one per flush.
        for &i in &untried {
            local.unbilled[i].retry_at_ms = retry_at_ms;
        }
        if charged.is_empty() {
            return;
        }
        let mut done = vec![false; local.unbilled.len()];
        for &i in &charged {
            done[i] = true;
        }
        let mut micros = 0_i64;
        let mut done = done.into_iter();
        local.unbilled.retain(|u| {
            let keep = !done.next().unwrap_or(false);
            if !keep {
                micros += u.entry.cost().micros();
            }
            keep
        });
        drop(local);
        self.pending_total
            .fetch_sub(charged.len(), Ordering::Relaxed);
        self.stats
            .unbilled_decisions
            .fetch_sub(charged.len() as u64, Ordering::Relaxed);
        self.stats
            .unbilled_micros
            .fetch_sub(micros.max(0) as u64, Ordering::Relaxed);
    }

    /// The wait after `failures` failed direct charges: one flush interval, doubled per
    /// failure, at most [`UNBILLED_RETRY_MS_MAX`].
    fn retry_wait_ms(&self, failures: u32) -> i64 {
        let base = i64::try_from(self.settings.flush_interval_ms.max(1)).unwrap_or(1);
        let factor = 1_i64 << failures.saturating_sub(1).min(20);
        base.saturating_mul(factor).min(UNBILLED_RETRY_MS_MAX)
    }

    /// Charges one decision of an expired lease as a strict debit at its event time, under its
    /// own key, or under a derived key when its key is remembered for another request, as a
    /// settlement does (`derived_key`). A retry sends the same command, so a charge made by an
    /// attempt whose reply was lost replays instead of charging again (`forced` is not part of
    /// what the region compares).
    async fn charge_directly(
        &self,
        account: &AccountId,
        entry: &LeaseUsage,
        forced: bool,
    ) -> DirectCharge {
        let cost = entry.cost();
        let fingerprint = debit_fingerprint(&entry.feature, cost, &entry.price);
        let timeout = Duration::from_millis(self.settings.store_timeout_ms);
        let mut key = entry.key.clone();
        for _ in 0..=DERIVED_KEYS_MAX {
            let command = DebitCommand {
                account: account.clone(),
                key: key.clone(),
                feature: entry.feature.clone(),
                cost,
                // The event's time: the record carries it, and grants are judged as of then.
                now: entry.at,
                actor: entry.actor.clone(),
                price: entry.price,
                forced,
            };
            match tokio::time::timeout(timeout, self.store.debit(&command)).await {
                Ok(Ok(DebitOutcome::Allowed(_))) => {
                    if key != entry.key {
                        self.stats.rekeyed.fetch_add(1, Ordering::Relaxed);
                        warn!(%account, key = %entry.key, charged_as = %key, "idempotency key reused with a different request; charged under a derived key");
                    }
                    return DirectCharge::Charged;
                }
                Ok(Ok(DebitOutcome::Refused(refusal))) => return DirectCharge::Refused(refusal),
                Ok(Err(RegionError::IdempotencyConflict)) => {
                    key = derived_key(&key, &fingerprint);
                }
                Ok(Err(error)) => return DirectCharge::Failed(error.to_string()),
                Err(_) => return DirectCharge::Failed("timed out".to_string()),
            }
        }
        DirectCharge::KeysExhausted
    }

    /// Flushes every account with pending decisions, a bounded number at a time.
    pub async fn flush_dirty(&self) {
        let mut accounts: Vec<AccountId> =
            std::mem::take(&mut *self.dirty.lock().unwrap_or_else(|p| p.into_inner()));
        accounts.sort();
        accounts.dedup();
        for chunk in accounts.chunks(FLUSH_PARALLEL_MAX) {
            let flushes = chunk.iter().filter_map(|account| {
                let lease = self.accounts.get(account).map(|l| Arc::clone(&l))?;
                Some(async move { self.flush(account, &lease).await })
            });
            futures_util::future::join_all(flushes).await;
        }
    }

    /// Renews leases that are about to expire and returns idle ones to the region. The
    /// flusher's maintenance task calls this every second; public so that a simulation can
    /// drive it on a virtual clock instead.
    pub async fn maintain(&self) {
        let now = self.clock.now().millis();
        let accounts: Vec<(AccountId, Arc<AccountLease>)> = self
            .accounts
            .iter()
            .map(|e| (e.key().clone(), Arc::clone(e.value())))
            .collect();
        for (account, lease) in accounts {
            let (idle, has_pending, deadline_ms) = {
                let local = lease.local();
                (
                    now - local.last_used_ms > self.settings.lease_idle_ms,
                    !local.pending.is_empty(),
                    local.deadline_ms,
                )
            };
            if has_pending {
                continue;
            }
            if idle {
                self.give_back(&account, &lease).await;
                continue;
            }
            // An empty settlement renews the lease in the region, once half its life has passed
            // since the last take or settlement, or when its deadline would pass before the next
            // round (a busy lease is renewed by its flushes). A failure is retried next round.
            let mut region = lease.region.lock().await;
            let due = now - region.renewed_at_ms >= self.settings.lease_ttl_ms / 2
                || now + MAINTENANCE_MS as i64 >= deadline_ms;
            if region.live && due {
                let _ = self.settle(&account, &mut region, &lease, Vec::new()).await;
            }
        }
    }

    /// Flushes and gives back this edge's lease on `account`, if it holds one: another edge of
    /// the region needs its credits.
    pub async fn give_back_account(&self, account: &AccountId) {
        let Some(lease) = self.accounts.get(account).map(|l| Arc::clone(&l)) else {
            return;
        };
        self.stats.recalled.fetch_add(1, Ordering::Relaxed);
        self.give_back(account, &lease).await;
    }

    /// Answers recall notices ([`Change::Recall`]) for as long as the runtime runs: each one
    /// gives back this edge's lease on the account. Subscribes again after losing the channel.
    pub fn spawn_recall_listener(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let leases = Arc::clone(self);
        tokio::spawn(async move {
            while !leases.stopping.load(Ordering::Relaxed) {
                let mut changes = match leases.store.watch_changes().await {
                    Ok(changes) => changes,
                    Err(error) => {
                        warn!(%error, "recall notices unavailable; retrying");
                        tokio::time::sleep(Duration::from_millis(MAINTENANCE_MS)).await;
                        continue;
                    }
                };
                while let Some(change) = changes.recv().await {
                    if let Change::Recall(account) = change {
                        leases.give_back_account(&account).await;
                    }
                }
            }
        })
    }

    async fn give_back(&self, account: &AccountId, lease: &Arc<AccountLease>) {
        self.flush(account, lease).await;
        let mut region = lease.region.lock().await;
        {
            // Checked and marked under the lock decisions take: none can slip in between.
            let mut local = lease.local();
            if !local.pending.is_empty() {
                return;
            }
            local.retired = true;
        }
        if region.live {
            match self
                .store
                .return_lease(account, &self.lease_id, self.clock.now())
                .await
            {
                Ok(_) => *region = RegionSide::default(),
                Err(error) => {
                    warn!(%account, %error, "lease return failed; it will expire in the region");
                    lease.local().retired = false;
                    return;
                }
            }
        }
        {
            let mut local = lease.local();
            if !local.unbilled.is_empty() {
                // The lease is back in the region, but decisions wait to be charged: keep the
                // account (its flushes retry them), empty, and open to a new lease. Checked
                // under the region lock, the only one under which unbilled decisions are added.
                local.slices.clear();
                local.overdraft = 0;
                local.deadline_ms = 0;
                local.retired = false;
                return;
            }
        }
        drop(region);
        self.accounts.remove(account);
    }

    /// Runs the flusher (every flush interval, pending decisions go to the region) and, in a task
    /// of its own, maintenance (every second, leases near the end of their life are renewed and
    /// idle ones given back).
    pub fn spawn_flusher(self: &Arc<Self>) -> Vec<tokio::task::JoinHandle<()>> {
        let flusher = Arc::clone(self);
        let flushing = tokio::spawn(async move {
            let mut flush = tokio::time::interval(Duration::from_millis(
                flusher.settings.flush_interval_ms.max(1),
            ));
            flush.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            while !flusher.stopping.load(Ordering::Relaxed) {
                flush.tick().await;
                flusher.flush_dirty().await;
            }
        });
        // Maintenance walks every lease; it runs apart so that it can never hold up a flush.
        let maintainer = Arc::clone(self);
        let maintaining = tokio::spawn(async move {
            let mut maintenance = tokio::time::interval(Duration::from_millis(MAINTENANCE_MS));
            maintenance.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            while !maintainer.stopping.load(Ordering::Relaxed) {
                maintenance.tick().await;
                maintainer.maintain().await;
            }
        });
        vec![flushing, maintaining]
    }

    /// Stops new cached decisions, flushes everything and returns every lease.
    pub async fn shutdown(&self) {
        self.stopping.store(true, Ordering::Relaxed);
        let accounts: Vec<(AccountId, Arc<AccountLease>)> = self
            .accounts
            .iter()
            .map(|e| (e.key().clone(), Arc::clone(e.value())))
            .collect();
        for (account, lease) in &accounts {
            self.give_back(account, lease).await;
        }
        self.log_left_at_shutdown(&accounts);
    }

    /// Logs what the final flush could not bring to the region: decisions not flushed (the
    /// store did not answer), and unbilled decisions (served, lease expired, not charged).
    /// Both are lost with this process.
    fn log_left_at_shutdown(&self, accounts: &[(AccountId, Arc<AccountLease>)]) {
        let mut pending = 0_usize;
        let mut unbilled = 0_usize;
        let mut unbilled_micros = 0_i64;
        for (account, lease) in accounts {
            let local = lease.local();
            pending += local.pending.len();
            for left in &local.unbilled {
                if unbilled < UNBILLED_LOGGED_AT_SHUTDOWN_MAX {
                    error!(%account, key = %left.entry.key, cost = %left.entry.cost(), at = %left.entry.at, failures = left.failures, "served cached decision not charged at shutdown");
                }
                unbilled += 1;
                unbilled_micros += left.entry.cost().micros();
            }
        }
        if pending > 0 || unbilled > 0 {
            error!(
                pending,
                unbilled,
                unbilled_credits = %Credits::from_micros(unbilled_micros),
                "decisions left uncharged at shutdown are lost with this process"
            );
        }
    }
}
