//! The decisions: price a request from memory, then spend in strict mode (one atomic call on the
//! regional store) or cached mode (the edge's in-memory lease). The gRPC and gateway adapters
//! only decode, call this, and encode.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use tollgate_core::{
    AccountId, ActorId, Credits, Draw, FeatureKey, HoldId, IdempotencyKey, PriceRule, Quantity,
    Rate, Timestamp,
};
use tollgate_region::{
    check_amount, AccountSummary, Allowed, AuthorizeCommand, AuthorizeOutcome, CaptureCommand,
    CaptureOutcome, DebitCommand, DebitOutcome, EnforcementMode, HoldRefusal, PriceTag, Refusal,
    RegionStore, ReleaseCommand, ReleaseOutcome, ReverseCommand, ReverseOutcome, ReverseRefusal,
    UsageId,
};
use tracing::warn;

use crate::catalogue::Catalogue;
use crate::clock::Clock;
use crate::error::EngineError;
use crate::leases::{LeaseDecision, Leases};
use crate::settings::{EdgeSettings, EVENT_TIME_FUTURE_MS_MAX, EVENT_TIME_PAST_MS_MAX};

/// What a request spends: a quantity priced by the price book, or credits named by the caller.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Spend {
    Quantity(Quantity),
    Cost(Credits),
}

impl Spend {
    /// The request field the spend came from, named when its cost is out of range.
    fn field(self) -> &'static str {
        match self {
            Spend::Quantity(_) => "usage.quantity",
            Spend::Cost(_) => "usage.cost",
        }
    }
}

/// The regional store keeps amounts exact only up to `REGION_MICROS_MAX` and refuses a cost
/// beyond it; checked before spending, so that the refusal names the caller's field (the
/// store's own check names its `cost`, and a lease top-up its `amount`).
fn check_cost(spend: Spend, priced: &Priced) -> Result<(), EngineError> {
    check_amount(spend.field(), priced.cost).map_err(EngineError::from)
}

/// The price a request was decided at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Priced {
    pub cost: Credits,
    /// `None` when the caller named the cost.
    pub rate: Option<Rate>,
    /// The units priced; `None` when the caller named the cost.
    pub quantity: Option<Quantity>,
    /// 0 when the caller named the cost.
    pub version: u64,
    pub rule: PriceRule,
}

impl Priced {
    fn tag(&self) -> PriceTag {
        PriceTag {
            version: self.version,
            rule: self.rule,
            quantity: self.quantity,
            rate: self.rate,
        }
    }

    /// The price a replayed decision was first made at, when the region kept it: a retry can
    /// be priced differently here (a newer price book version took effect since), and it must
    /// still answer with the first decision's price and cost.
    fn first(self, allowed: &Allowed) -> Priced {
        let Some(tag) = allowed.price else {
            return self;
        };
        let cost = allowed
            .draws
            .iter()
            .try_fold(allowed.overdraft, |sum, draw| {
                sum.checked_add(draw.amount).ok()
            })
            .unwrap_or(self.cost);
        Priced {
            cost,
            rate: tag.rate,
            quantity: tag.quantity,
            version: tag.version,
            rule: tag.rule,
        }
    }
}

/// Why nothing was spent. Refusals are answers, not errors.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refused {
    Insufficient {
        cost: Credits,
        available: Credits,
        shortfall: Credits,
    },
    RateLimited {
        feature: FeatureKey,
        retry_after_ms: Option<u64>,
    },
    /// The region could not pay and the authority, which may hold the rest of the account's
    /// credits, could not be reached: not the account's answer, and said so. `balance` is the
    /// account's balance as this edge last knew it.
    AuthorityUnreachable {
        cost: Credits,
        available: Credits,
        balance: Credits,
    },
    UnknownFeature(FeatureKey),
    UnknownAccount(AccountId),
    Hold(HoldRefusal),
    Reverse(ReverseRefusal),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DebitRequest {
    pub account: AccountId,
    pub key: IdempotencyKey,
    pub feature: FeatureKey,
    pub spend: Spend,
    pub actor: Option<ActorId>,
    pub mode: Option<EnforcementMode>,
    pub event_time: Option<Timestamp>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Debited {
    pub priced: Priced,
    pub draws: Vec<Draw>,
    pub overdraft: Credits,
    /// The debit's id in the usage stream (strict); `None` until a cached decision is flushed.
    pub usage_id: Option<UsageId>,
    pub mode: EnforcementMode,
    pub replayed: bool,
    /// What the account can still spend in this region after the decision.
    pub available_after: Credits,
    /// The account's balance after the decision (see [`account_balance`]).
    pub balance_after: Credits,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision<T> {
    Done(T),
    Refused(Refused),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuthorizeRequest {
    pub account: AccountId,
    pub key: IdempotencyKey,
    pub feature: FeatureKey,
    pub spend: Spend,
    pub ttl_ms: i64,
    pub actor: Option<ActorId>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Authorized {
    pub hold_id: HoldId,
    pub priced: Priced,
    /// What the hold set aside: the region's draws and overdraft (a capture takes from them in
    /// this order).
    pub draws: Vec<Draw>,
    pub overdraft: Credits,
    pub expires_at: Timestamp,
    pub replayed: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Captured {
    pub captured: Credits,
    pub released: Credits,
    pub usage_id: UsageId,
    pub replayed: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Quote {
    pub priced: Priced,
    pub available: Credits,
    pub affordable: bool,
}

/// The account as this edge sees it: the region's view plus the authority's last summary.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BalanceView {
    pub summary: Arc<AccountSummary>,
    /// The account's balance (see [`account_balance`]).
    pub balance: Credits,
    /// What the account can spend now (on the feature, when one was named): its credits
    /// effective now, in this region or outside it, less holds, plus overdraft room.
    pub available: Credits,
    /// What this region can spend now without asking the authority: segments (all, or those
    /// covering the feature), this edge's lease, and the region's overdraft room.
    pub region_available: Credits,
    pub held: Credits,
}

/// One view's figures of an account (see [`BalanceView`]).
struct Figures {
    /// The summary the figures were told from (the one matching the region's move count).
    summary: Arc<AccountSummary>,
    balance: Credits,
    available: Credits,
    region_available: Credits,
    held: Credits,
}

/// The authority's answer to a cold-path request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AllocationAnswer {
    pub exists: bool,
    /// Credits the authority still holds for the account after allocating (covering the
    /// feature asked for), when it said.
    pub unallocated: Option<Credits>,
}

impl AllocationAnswer {
    pub const UNKNOWN: AllocationAnswer = AllocationAnswer {
        exists: false,
        unallocated: None,
    };
}

/// The cold path: asks the authority for an allocation in this region, of at least `needed`
/// when a spend the region could not pay is short of it.
pub trait AllocationRequester: Send + Sync + 'static {
    fn request_allocation<'a>(
        &'a self,
        account: &'a AccountId,
        feature: Option<&'a FeatureKey>,
        needed: Credits,
    ) -> Pin<Box<dyn Future<Output = Result<AllocationAnswer, EngineError>> + Send + 'a>>;
}

/// The account's debt as one region sees it: the summary's debt basis less the overdraft room
/// the region has left.
fn debt_seen(summary: &AccountSummary, overdraft_room: Credits) -> Credits {
    summary.debt_basis.saturating_sub_floor_zero(overdraft_room)
}

/// The single-flight cell holding the authority's last answer about `account`. Past
/// `COLD_PATH_ANSWERS_MAX` accounts, answers no longer worth `keep`ing are dropped first, so the
/// map stays bounded.
fn answer_cell<T: Send>(
    map: &DashMap<AccountId, Arc<tokio::sync::Mutex<Option<T>>>>,
    account: &AccountId,
    keep: impl Fn(&T) -> bool,
) -> Arc<tokio::sync::Mutex<Option<T>>> {
    if map.len() >= COLD_PATH_ANSWERS_MAX {
        map.retain(|_, cell| {
            cell.try_lock()
                .map_or(true, |answer| answer.as_ref().is_some_and(&keep))
        });
    }
    Arc::clone(
        map.entry(account.clone())
            .or_insert_with(|| Arc::new(tokio::sync::Mutex::new(None)))
            .value(),
    )
}

/// The account's balance as one region sees it: what the region holds that can be spent at
/// `at` (its active segments, `region_credits`), plus what the authority's summary says is
/// held outside the region and effective at `at`, less the debt (the summary's debt basis
/// less the overdraft room the region has left). Holds are already out of the segments.
pub fn account_balance(
    summary: &AccountSummary,
    region_credits: Credits,
    overdraft_room: Credits,
    at: Timestamp,
) -> Credits {
    let debt = debt_seen(summary, overdraft_room);
    let credits = region_credits
        .checked_add(summary.outside_at(at, None))
        .unwrap_or(Credits::MAX);
    credits
        .checked_sub(debt)
        .unwrap_or(Credits::from_micros(-tollgate_region::REGION_MICROS_MAX))
}

pub struct Engine<S: RegionStore> {
    store: Arc<S>,
    catalogue: Arc<Catalogue>,
    leases: Arc<Leases<S>>,
    settings: Arc<EdgeSettings>,
    clock: Arc<dyn Clock>,
    allocator: Option<Arc<dyn AllocationRequester>>,
    /// Per account, the authority's last answer to a cold-path request and when it came. The
    /// lock makes the request single-flight: concurrent cold requests for one account wait for
    /// the one in flight and use its answer instead of being refused meanwhile.
    asked: DashMap<AccountId, Arc<tokio::sync::Mutex<Option<Asked>>>>,
    /// Per account, the last request for credits a spend was short of (single-flight too).
    short: DashMap<AccountId, Arc<tokio::sync::Mutex<Option<AskedForCredits>>>>,
    /// Per account, the region as this edge last read it (see [`RegionSeen`]): what a cached
    /// decision's balance counts besides its lease, without a call to the region.
    region_seen: DashMap<AccountId, RegionSeen>,
    /// Per account, a move count whose summary was read again and found not published yet, and
    /// when (see [`Engine::summary_matching`]).
    summary_behind: DashMap<AccountId, (u64, i64)>,
}

/// The region's figures for an account as this edge last read them (a strict decision's
/// result or a view), carried forward by this edge's own cached decisions.
#[derive(Clone, Copy, Debug)]
struct RegionSeen {
    /// The region's active segments plus what this edge's lease can still pay. Invariant under
    /// the lease's refills and returns (credits move between the two); each cached decision
    /// from the lease takes its cost off.
    credits: Credits,
    /// The region's overdraft room left.
    room: Credits,
}

/// How often an edge reads an account's summary again while the summary published is behind
/// the region's move count (ms).
pub const SUMMARY_REREAD_MS: i64 = 100;

/// Accounts whose region figures an edge remembers at most; past it, those without a lease
/// here are dropped.
pub const REGION_SEEN_MAX: usize = 1_000_000;

/// The authority's last answer to a request for missing credits.
#[derive(Clone, Debug)]
struct AskedForCredits {
    at_ms: i64,
    /// The authority said it holds nothing more for this feature (`None`: for any feature).
    exhausted: Option<Option<FeatureKey>>,
}

/// How the authority took part in a decision.
enum ColdPath {
    NotAsked,
    /// Credits were asked for; the account's summary as published after.
    Asked(Arc<AccountSummary>),
    /// Credits were missing and the authority could not be reached.
    Unreachable,
}

impl ColdPath {
    /// The summary to tell the balance from.
    fn summary<'a>(&'a self, before: &'a Arc<AccountSummary>) -> &'a Arc<AccountSummary> {
        match self {
            ColdPath::Asked(fresh) => fresh,
            _ => before,
        }
    }
}

/// What asking the authority for missing credits came to.
enum Asking {
    /// Credits may have arrived: decide again. `last`: this decision asked, and the authority
    /// has nothing more, so deciding again gives the account's answer.
    Brought { last: bool },
    /// The authority holds nothing more for the account: the region's refusal is the account's.
    NothingMore,
    /// The authority could not be reached.
    Unreachable,
}

/// After the authority said it has nothing more for an account, asks for the same feature
/// wait this long unless the account's summary is published again (a grant, a refund, a
/// take-back publish it), so a refused account does not send every refusal to the authority.
pub const COLD_PATH_EXHAUSTED_TTL_MS: i64 = 1_000;
/// Times one decision asks the authority for missing credits at most (a concurrent decision
/// may take what the first answer brought).
pub const COLD_PATH_ASKS_MAX: usize = 3;
/// Longest pause between two looks at the region while leases are being recalled, in ms.
const RECALL_POLL_MS_MAX: u64 = 8;

/// The authority's answer to a cold-path request.
#[derive(Clone, Copy, Debug)]
struct Asked {
    at_ms: i64,
    exists: bool,
}

/// Accounts whose cold-path answers are remembered at most; past it, old answers are dropped.
pub const COLD_PATH_ANSWERS_MAX: usize = 1_000_000;

impl<S: RegionStore> Engine<S> {
    pub fn new(store: Arc<S>, settings: EdgeSettings, clock: Arc<dyn Clock>) -> Self {
        let settings = Arc::new(settings);
        Engine {
            catalogue: Arc::new(Catalogue::new(&settings)),
            leases: Arc::new(Leases::new(
                Arc::clone(&store),
                Arc::clone(&settings),
                Arc::clone(&clock),
            )),
            store,
            settings,
            clock,
            allocator: None,
            asked: DashMap::new(),
            short: DashMap::new(),
            region_seen: DashMap::new(),
            summary_behind: DashMap::new(),
        }
    }

    pub fn with_allocator(mut self, allocator: Arc<dyn AllocationRequester>) -> Self {
        self.allocator = Some(allocator);
        self
    }

    pub fn catalogue(&self) -> &Arc<Catalogue> {
        &self.catalogue
    }

    pub fn leases(&self) -> &Arc<Leases<S>> {
        &self.leases
    }

    pub fn settings(&self) -> &EdgeSettings {
        &self.settings
    }

    pub fn now(&self) -> Timestamp {
        self.clock.now()
    }

    /// Loads the price book, then keeps the catalogue current and flushes cached usage in the
    /// background. The tasks end when the runtime does, or are aborted by the caller.
    pub async fn start(&self) -> Vec<tokio::task::JoinHandle<()>> {
        if let Err(error) = self.catalogue.reload_prices(self.store.as_ref()).await {
            warn!(%error, "price book not loaded at start; the watcher will retry");
        }
        vec![self.catalogue.spawn_watcher(
            Arc::clone(&self.store),
            Arc::clone(&self.clock),
            self.settings.price_poll_ms,
        )]
        .into_iter()
        .chain(self.leases.spawn_flusher())
        .chain([self.leases.spawn_recall_listener()])
        .collect()
    }

    /// Flushes every pending cached decision and returns every lease (graceful shutdown).
    pub async fn shutdown(&self) {
        self.leases.shutdown().await;
    }

    /// A call on the regional store, bounded by the store timeout.
    async fn call<T>(
        &self,
        work: impl Future<Output = Result<T, tollgate_region::RegionError>>,
    ) -> Result<T, EngineError> {
        match tokio::time::timeout(Duration::from_millis(self.settings.store_timeout_ms), work)
            .await
        {
            Ok(result) => result.map_err(EngineError::from),
            Err(_) => Err(EngineError::Unavailable(format!(
                "regional store did not answer within {} ms",
                self.settings.store_timeout_ms
            ))),
        }
    }

    /// The account's summary, asking the authority once when the region does not know it.
    async fn summary(
        &self,
        account: &AccountId,
        feature: Option<&FeatureKey>,
    ) -> Result<Option<Arc<AccountSummary>>, EngineError> {
        let now = self.clock.now();
        if let Some(summary) = self.call_catalogue(account, now).await? {
            return Ok(Some(summary));
        }
        if self.ask_authority(account, feature).await? {
            return self
                .catalogue
                .load_account(self.store.as_ref(), account, now)
                .await;
        }
        Ok(None)
    }

    async fn call_catalogue(
        &self,
        account: &AccountId,
        now: Timestamp,
    ) -> Result<Option<Arc<AccountSummary>>, EngineError> {
        let lookup = self.catalogue.account(self.store.as_ref(), account, now);
        match tokio::time::timeout(
            Duration::from_millis(self.settings.store_timeout_ms),
            lookup,
        )
        .await
        {
            Ok(result) => result,
            Err(_) => Err(EngineError::Unavailable(
                "regional store did not answer in time".into(),
            )),
        }
    }

    /// Asks the authority for an allocation, at most once per unknown-account window per
    /// account. Returns whether it answered that the account exists. A request already in
    /// flight is waited for and its answer shared; a failed request is not remembered, so the
    /// next call asks again (and this one fails as unavailable, never as an unknown account).
    async fn ask_authority(
        &self,
        account: &AccountId,
        feature: Option<&FeatureKey>,
    ) -> Result<bool, EngineError> {
        let Some(allocator) = &self.allocator else {
            return Ok(false);
        };
        let arrived_ms = self.clock.now().millis();
        let ttl = self.settings.unknown_account_ttl_ms;
        let cell = answer_cell(&self.asked, account, |a| arrived_ms - a.at_ms < ttl);
        let (mut answer, waited) = match cell.try_lock() {
            Ok(answer) => (answer, false),
            Err(_) => (cell.lock().await, true),
        };
        if let Some(asked) = *answer {
            if waited && asked.at_ms >= arrived_ms {
                // Answered while this call waited: the allocation it brought is for us too.
                return Ok(asked.exists);
            }
            if arrived_ms - asked.at_ms < self.settings.unknown_account_ttl_ms {
                // Asked recently and the region still has nothing: do not ask again yet.
                return Ok(false);
            }
        }
        match allocator
            .request_allocation(account, feature, Credits::ZERO)
            .await
        {
            Ok(AllocationAnswer { exists, .. }) => {
                *answer = Some(Asked {
                    at_ms: self.clock.now().millis().max(arrived_ms),
                    exists,
                });
                Ok(exists)
            }
            Err(error) => {
                *answer = None;
                Err(error)
            }
        }
    }

    /// Runs a spending call on the regional store. When the region cannot pay (a slice is a
    /// means, never the answer), asks the authority for what is missing and runs the call
    /// again, so the refusal that comes back is the account's. Returns the outcome and how the
    /// authority took part.
    async fn with_cold_path<T, F, Fut>(
        &self,
        summary: &Arc<AccountSummary>,
        feature: &FeatureKey,
        call: F,
        shortfall_of: impl Fn(&T) -> Option<Credits>,
    ) -> Result<(T, ColdPath), EngineError>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<T, tollgate_region::RegionError>>,
    {
        // When the region call was made, while another decision's answer may still be shared.
        let mut called_ms = Some(self.clock.now().millis());
        let mut outcome = self.call(call()).await?;
        let mut cold = ColdPath::NotAsked;
        for _ in 0..COLD_PATH_ASKS_MAX {
            let Some(shortfall) = shortfall_of(&outcome) else {
                break;
            };
            let asked = self
                .ask_for_credits(summary, feature, shortfall, called_ms)
                .await?;
            // Another decision's answer is shared once; if that was not enough, ask ourselves.
            called_ms = None;
            let last = match asked {
                Asking::Brought { last } => last,
                Asking::NothingMore => break,
                Asking::Unreachable => return Ok((outcome, ColdPath::Unreachable)),
            };
            // The allocation moved credits from outside the region into it and published the
            // account's summary anew: the balance is told from that one.
            let now = self.clock.now();
            let fresh = self
                .catalogue
                .load_account(self.store.as_ref(), &summary.account, now)
                .await?;
            cold = ColdPath::Asked(fresh.unwrap_or_else(|| Arc::clone(summary)));
            outcome = self.call(call()).await?;
            if last {
                // This decision's own request found the authority with nothing more.
                break;
            }
        }
        if let Some(shortfall) = shortfall_of(&outcome) {
            if let Some(paid) = self
                .recall_leases(&summary.account, shortfall, &call, &shortfall_of)
                .await?
            {
                outcome = paid;
            }
        }
        Ok((outcome, cold))
    }

    /// The region cannot pay, and the authority has nothing more for it: when edges of the
    /// region hold at least the shortfall on their leases, asks them all to give their leases
    /// back (this edge's own included) and decides again as credits come back, for at most
    /// `recall_wait_ms`. Returns the outcome decided last, or `None` when nothing was recalled.
    /// An edge that does not answer (it crashed) keeps its lease until the lease expires.
    async fn recall_leases<T, F, Fut>(
        &self,
        account: &AccountId,
        shortfall: Credits,
        call: &F,
        shortfall_of: &impl Fn(&T) -> Option<Credits>,
    ) -> Result<Option<T>, EngineError>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<T, tollgate_region::RegionError>>,
    {
        if self.settings.recall_wait_ms == 0 {
            return Ok(None);
        }
        let leased = |view: &tollgate_region::AccountView| view.leased;
        let view = self
            .call(self.store.view(account, self.clock.now()))
            .await?;
        let mut out = leased(&view);
        if out < shortfall {
            return Ok(None);
        }
        self.call(self.store.recall_leases(account)).await?;
        let deadline = tokio::time::Instant::now()
            + std::time::Duration::from_millis(self.settings.recall_wait_ms);
        let mut pause = std::time::Duration::from_millis(1);
        let mut outcome = None;
        while tokio::time::Instant::now() < deadline {
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(std::time::Duration::from_millis(RECALL_POLL_MS_MAX));
            // Looked at before deciding, so a decision made after the leases are all back
            // sees their credits.
            let view = self
                .call(self.store.view(account, self.clock.now()))
                .await?;
            let still_out = leased(&view);
            let decided = self.call(call()).await?;
            let paid = shortfall_of(&decided).is_none();
            outcome = Some(decided);
            if paid || still_out.is_zero() {
                break;
            }
            if still_out >= out {
                // Nothing came back since the last notice, which is fire-and-forget (a holder
                // may have been reconnecting): say it again.
                self.call(self.store.recall_leases(account)).await?;
            }
            out = still_out;
        }
        Ok(outcome)
    }

    /// Asks the authority for `shortfall` more credits of the account in this region. One
    /// request per account at a time: a decision arriving while one is in flight waits for it
    /// and decides again with what it brought. After the authority said it has nothing more,
    /// the account is not asked about again for the same feature until its summary is
    /// published anew or [`COLD_PATH_EXHAUSTED_TTL_MS`] has passed.
    async fn ask_for_credits(
        &self,
        summary: &AccountSummary,
        feature: &FeatureKey,
        shortfall: Credits,
        called_ms: Option<i64>,
    ) -> Result<Asking, EngineError> {
        let Some(allocator) = &self.allocator else {
            return Ok(Asking::NothingMore);
        };
        let arrived_ms = self.clock.now().millis();
        let cell = answer_cell(&self.short, &summary.account, |l| {
            arrived_ms - l.at_ms < COLD_PATH_EXHAUSTED_TTL_MS
        });
        let mut last = cell.lock().await;
        if let Some(previous) = last.as_ref() {
            if called_ms.is_some_and(|called| previous.at_ms >= called) {
                // Answered since this decision's region call: decide again with what it brought.
                return Ok(Asking::Brought { last: false });
            }
            let same_feature = |f: &Option<FeatureKey>| f.as_ref().is_none_or(|f| f == feature);
            if previous.exhausted.as_ref().is_some_and(same_feature)
                && arrived_ms - previous.at_ms < COLD_PATH_EXHAUSTED_TTL_MS
            {
                // The summary this edge holds may predate a grant whose notice has not arrived
                // (or was lost): one read of the region's copy tells whether the authority
                // published the account since it said "nothing more".
                let published = summary.published_at.millis() > previous.at_ms
                    || self
                        .catalogue
                        .load_account(self.store.as_ref(), &summary.account, self.clock.now())
                        .await?
                        .is_some_and(|fresh| fresh.published_at.millis() > previous.at_ms);
                if !published {
                    return Ok(Asking::NothingMore);
                }
            }
        }
        let answer = allocator
            .request_allocation(&summary.account, Some(feature), shortfall)
            .await;
        let at_ms = self.clock.now().millis().max(arrived_ms);
        match answer {
            Ok(answer) => {
                let nothing_more = !answer.exists || answer.unallocated == Some(Credits::ZERO);
                let exhausted = nothing_more.then(|| Some(feature.clone()));
                *last = Some(AskedForCredits { at_ms, exhausted });
                Ok(Asking::Brought { last: nothing_more })
            }
            Err(EngineError::Unavailable(reason)) => {
                *last = None;
                warn!(account = %summary.account, %reason, "authority unreachable on the cold path");
                Ok(Asking::Unreachable)
            }
            Err(other) => {
                *last = None;
                Err(other)
            }
        }
    }

    /// An edge may start before the authority has published a price book: with none in memory,
    /// read the region's before deciding (the watcher keeps it current afterwards).
    async fn ensure_prices(&self, spend: Spend) -> Result<(), EngineError> {
        if matches!(spend, Spend::Quantity(_)) && self.catalogue.price_generation() == 0 {
            let reload = self.catalogue.reload_prices(self.store.as_ref());
            match tokio::time::timeout(
                Duration::from_millis(self.settings.store_timeout_ms),
                reload,
            )
            .await
            {
                Ok(result) => result?,
                Err(_) => {
                    return Err(EngineError::Unavailable(
                        "regional store did not answer in time".into(),
                    ))
                }
            }
        }
        Ok(())
    }

    fn price(
        &self,
        summary: &AccountSummary,
        feature: &FeatureKey,
        spend: Spend,
        at: Timestamp,
    ) -> Result<Result<Priced, Refused>, EngineError> {
        match spend {
            Spend::Cost(cost) => Ok(Ok(Priced {
                cost,
                rate: None,
                quantity: None,
                version: 0,
                rule: PriceRule::Default,
            })),
            Spend::Quantity(quantity) => match self.catalogue.price(summary, feature, at) {
                Ok(price) => {
                    let cost =
                        price
                            .cost(quantity)
                            .map_err(|error| EngineError::InvalidArgument {
                                field: "usage.quantity",
                                message: format!("cost of {quantity} units: {error}"),
                            })?;
                    Ok(Ok(Priced {
                        cost,
                        rate: Some(price.rate),
                        quantity: Some(quantity),
                        version: price.version,
                        rule: price.rule,
                    }))
                }
                Err(EngineError::UnknownFeature(feature)) => {
                    Ok(Err(Refused::UnknownFeature(feature)))
                }
                Err(other) => Err(other),
            },
        }
    }

    fn event_time(&self, event_time: Option<Timestamp>) -> Result<Timestamp, EngineError> {
        let now = self.clock.now();
        let Some(at) = event_time else { return Ok(now) };
        let offset = at.millis() - now.millis();
        if offset > EVENT_TIME_FUTURE_MS_MAX || -offset > EVENT_TIME_PAST_MS_MAX {
            return Err(EngineError::InvalidArgument {
                field: "event_time",
                message: format!(
                    "{at} is outside the accepted window ({} s before now to {} s after)",
                    EVENT_TIME_PAST_MS_MAX / 1_000,
                    EVENT_TIME_FUTURE_MS_MAX / 1_000
                ),
            });
        }
        Ok(at)
    }

    pub async fn debit(&self, request: DebitRequest) -> Result<Decision<Debited>, EngineError> {
        let at = self.event_time(request.event_time)?;
        let Some(summary) = self
            .summary(&request.account, Some(&request.feature))
            .await?
        else {
            return Ok(Decision::Refused(Refused::UnknownAccount(request.account)));
        };
        self.ensure_prices(request.spend).await?;
        let priced = match self.price(&summary, &request.feature, request.spend, at)? {
            Ok(priced) => priced,
            Err(refused) => return Ok(Decision::Refused(refused)),
        };
        check_cost(request.spend, &priced)?;
        let mode = request.mode.unwrap_or(summary.mode);
        // A feature with a token bucket is decided in strict mode, so the bucket stays exact.
        if mode == EnforcementMode::Cached && !summary.rate_limited.contains(&request.feature) {
            return self.debit_cached(&summary, &request, &priced, at).await;
        }
        self.debit_strict(&summary, &request, &priced, at).await
    }

    async fn debit_strict(
        &self,
        summary: &Arc<AccountSummary>,
        request: &DebitRequest,
        priced: &Priced,
        at: Timestamp,
    ) -> Result<Decision<Debited>, EngineError> {
        let command = DebitCommand {
            account: request.account.clone(),
            key: request.key.clone(),
            feature: request.feature.clone(),
            cost: priced.cost,
            now: at,
            actor: request.actor.clone(),
            price: priced.tag(),
            forced: false,
        };
        let shortfall_of = |o: &DebitOutcome| match o {
            DebitOutcome::Refused(Refusal::Insufficient { shortfall, .. }) => Some(*shortfall),
            _ => None,
        };
        // This edge's lease as it was before the call, and whether a refill moved credits from
        // the region's pool into it meanwhile (then the script's pool and the lease may both
        // count them).
        let refills = || self.leases.stats().refills.load(Ordering::Relaxed);
        let (refills_before, lease_before) =
            (refills(), self.leases.available(&request.account, None, at));
        let (outcome, cold) = self
            .with_cold_path(
                summary,
                &request.feature,
                || self.store.debit(&command),
                shortfall_of,
            )
            .await?;
        let told = match &outcome {
            DebitOutcome::Allowed(allowed) => {
                self.summary_matching(cold.summary(summary), allowed.moves)
                    .await
            }
            DebitOutcome::Refused(_) => Arc::clone(cold.summary(summary)),
        };
        let told = told.as_ref();
        Ok(match outcome {
            DebitOutcome::Allowed(allowed) => Decision::Done(Debited {
                priced: if allowed.replayed {
                    priced.first(&allowed)
                } else {
                    *priced
                },
                available_after: allowed.pool,
                balance_after: if allowed.replayed {
                    // The pool and room the first decision saw; the lease is as it is now.
                    account_balance(told, allowed.pool, allowed.overdraft_room, at)
                } else {
                    let lease = self.leases.available(&request.account, None, at);
                    let credits = if refills() == refills_before {
                        let credits = allowed.pool.checked_add(lease).unwrap_or(Credits::MAX);
                        self.remember_seen(&request.account, credits, allowed.overdraft_room);
                        credits
                    } else {
                        let lease = lease.min(lease_before);
                        allowed.pool.checked_add(lease).unwrap_or(Credits::MAX)
                    };
                    account_balance(told, credits, allowed.overdraft_room, at)
                },
                draws: allowed.draws,
                overdraft: allowed.overdraft,
                usage_id: Some(allowed.usage_id),
                mode: EnforcementMode::Strict,
                replayed: allowed.replayed,
            }),
            DebitOutcome::Refused(refusal) => {
                Decision::Refused(self.refused(told, refusal, priced.cost, &cold, at))
            }
        })
    }

    /// The account's summary that matches the region's figures a decision or a view read at the
    /// account's move count `moves`: `summary` when its stamp is that count, else the summary
    /// as published now (read once more). The authority publishes a region's summary after it
    /// moves credits or overdraft room in or out; a summary read before the move counts the
    /// moved credits outside the region while the region's figures count them in it (the
    /// balance too high by them), one read after a later move the other way. When the summary
    /// published now is still not at `moves` (the authority has moved and not published yet),
    /// it is used all the same and the miss counted (`tollgate_edge_summary_behind_total`);
    /// the same count is read again for the account at most every [`SUMMARY_REREAD_MS`] (the
    /// change notice of the coming publish reloads it meanwhile).
    async fn summary_matching(
        &self,
        summary: &Arc<AccountSummary>,
        moves: Option<u64>,
    ) -> Arc<AccountSummary> {
        let Some(moves) = moves else {
            return Arc::clone(summary);
        };
        if summary.region_moves == moves {
            return Arc::clone(summary);
        }
        let account = &summary.account;
        let now = self.clock.now();
        if self
            .summary_behind
            .get(account)
            .is_some_and(|behind| behind.0 == moves && now.millis() - behind.1 < SUMMARY_REREAD_MS)
        {
            return Arc::clone(summary);
        }
        let stats = self.leases.stats();
        stats.summary_rereads.fetch_add(1, Ordering::Relaxed);
        let read = self
            .catalogue
            .load_account(self.store.as_ref(), account, now);
        let fresh =
            match tokio::time::timeout(Duration::from_millis(self.settings.store_timeout_ms), read)
                .await
            {
                Ok(Ok(Some(fresh))) => fresh,
                Ok(Err(error)) => {
                    warn!(%account, %error, "account summary not read again");
                    return Arc::clone(summary);
                }
                _ => return Arc::clone(summary),
            };
        if fresh.region_moves == moves {
            self.summary_behind.remove(account);
        } else {
            stats.summary_behind.fetch_add(1, Ordering::Relaxed);
            if self.summary_behind.len() >= REGION_SEEN_MAX {
                self.summary_behind.clear();
            }
            self.summary_behind
                .insert(account.clone(), (moves, now.millis()));
        }
        fresh
    }

    /// The region's active segments `pool` plus what this edge's lease can still pay (memory
    /// only): the region's credits as far as this edge can see them without another call
    /// (other edges' leases are not in a decision's result).
    fn seen_credits(&self, account: &AccountId, pool: Credits, at: Timestamp) -> Credits {
        pool.checked_add(self.leases.available(account, None, at))
            .unwrap_or(Credits::MAX)
    }

    fn remember_seen(&self, account: &AccountId, credits: Credits, room: Credits) {
        if self.region_seen.len() >= REGION_SEEN_MAX {
            self.region_seen.retain(|a, _| self.leases.holds(a));
        }
        self.region_seen
            .insert(account.clone(), RegionSeen { credits, room });
    }

    /// The balance after a cached decision of `cost` from this edge's lease (`lease_after`
    /// left): from the region's figures as this edge last read them, less its own cached
    /// decisions since; without them, from the lease alone. No call to the region.
    fn cached_balance(
        &self,
        summary: &AccountSummary,
        account: &AccountId,
        cost: Option<Credits>,
        lease_after: Credits,
        at: Timestamp,
    ) -> Credits {
        let seen = self.region_seen.get_mut(account).map(|mut seen| {
            if let Some(cost) = cost {
                seen.credits = seen.credits.saturating_sub_floor_zero(cost);
            }
            *seen
        });
        match seen {
            Some(seen) => account_balance(summary, seen.credits, seen.room, at),
            None => account_balance(summary, lease_after, Credits::ZERO, at),
        }
    }

    /// A region's refusal as the caller gets it: when the authority could not be reached to
    /// bring what was missing, it says so, with the account's balance as last known.
    fn refused(
        &self,
        summary: &AccountSummary,
        refusal: Refusal,
        cost: Credits,
        cold: &ColdPath,
        at: Timestamp,
    ) -> Refused {
        match refusal {
            Refusal::Insufficient { available, .. } if matches!(cold, ColdPath::Unreachable) => {
                Refused::AuthorityUnreachable {
                    cost,
                    available,
                    balance: account_balance(summary, available, Credits::ZERO, at),
                }
            }
            other => refused_of(other, cost),
        }
    }

    async fn debit_cached(
        &self,
        summary: &Arc<AccountSummary>,
        request: &DebitRequest,
        priced: &Priced,
        at: Timestamp,
    ) -> Result<Decision<Debited>, EngineError> {
        // A cold account (no lease here yet) is decided in one strict call while the lease is
        // taken in the background: a long tail of accounts seen once never waits for a lease.
        if !self.leases.holds(&request.account) {
            self.leases.warm(&request.account);
            let strict = self.debit_strict(summary, request, priced, at).await?;
            // The region may be short only because this edge's own lease is taking its credits
            // right now: then the lease pays.
            if !matches!(strict, Decision::Refused(Refused::Insufficient { .. })) {
                return Ok(strict);
            }
        }
        let decision = self
            .leases
            .debit(
                &request.account,
                &request.key,
                &request.feature,
                priced.cost,
                at,
                request.actor.clone(),
                priced.tag(),
            )
            .await?;
        Ok(match decision {
            LeaseDecision::Allowed {
                draws,
                overdraft,
                replayed,
                available_after,
            } => Decision::Done(Debited {
                priced: *priced,
                draws,
                overdraft,
                usage_id: None,
                mode: EnforcementMode::Cached,
                replayed,
                available_after,
                // From memory only: the region as this edge last read it less its own cached
                // decisions since, and the credits outside the region.
                balance_after: self.cached_balance(
                    summary,
                    &request.account,
                    (!replayed).then_some(priced.cost),
                    available_after,
                    at,
                ),
            }),
            // The lease and the region cannot pay: the region, with what the authority brings,
            // decides (a strict debit under the same key; nothing was charged from the lease).
            // So does it when the lease may not decide: its deadline passed, or too many
            // decisions wait to be flushed (a region that cannot be reached fails it closed).
            LeaseDecision::Insufficient { .. } | LeaseDecision::Declined(_) => {
                return self.debit_strict(summary, request, priced, at).await;
            }
        })
    }

    /// What the region holds for the account that can be spent at `at` (active segments, and
    /// credits out on leases less what this edge has spent from its lease and not yet
    /// flushed), and the region's overdraft room.
    /// `unflushed` is what this edge had not flushed when it read `view`, with no flush of its
    /// lease in between ([`Leases::with_unflushed`]).
    fn region_credits(
        unflushed: Credits,
        view: &tollgate_region::AccountView,
        at: Timestamp,
    ) -> (Credits, Credits) {
        let segments = view
            .segments
            .iter()
            .filter(|s| s.is_active_at(at))
            .map(|s| s.remaining);
        let leased = view.leased.saturating_sub_floor_zero(unflushed);
        let credits = Credits::checked_sum(segments.chain([leased])).unwrap_or(Credits::MAX);
        let room = view
            .overdraft_limit
            .saturating_sub_floor_zero(view.overdraft_used);
        (credits, room)
    }

    pub async fn authorize(
        &self,
        request: AuthorizeRequest,
    ) -> Result<Decision<Authorized>, EngineError> {
        let now = self.clock.now();
        let Some(summary) = self
            .summary(&request.account, Some(&request.feature))
            .await?
        else {
            return Ok(Decision::Refused(Refused::UnknownAccount(request.account)));
        };
        self.ensure_prices(request.spend).await?;
        let priced = match self.price(&summary, &request.feature, request.spend, now)? {
            Ok(priced) => priced,
            Err(refused) => return Ok(Decision::Refused(refused)),
        };
        check_cost(request.spend, &priced)?;
        // The hold's id is derived from the caller's key, so a replay names the same hold.
        let hold_id = hold_id_for_key(&request.key)
            .map_err(|e| EngineError::Internal(format!("hold id: {e}")))?;
        let expires_at =
            now.checked_add_ms(request.ttl_ms)
                .map_err(|_| EngineError::InvalidArgument {
                    field: "ttl_seconds",
                    message: "expiry out of range".into(),
                })?;
        let command = AuthorizeCommand {
            account: request.account.clone(),
            key: request.key.clone(),
            hold_id: hold_id.clone(),
            feature: request.feature.clone(),
            cost: priced.cost,
            now,
            expires_at,
            actor: request.actor.clone(),
            price: priced.tag(),
        };
        let shortfall_of = |o: &AuthorizeOutcome| match o {
            AuthorizeOutcome::Refused(Refusal::Insufficient { shortfall, .. }) => Some(*shortfall),
            _ => None,
        };
        let (outcome, cold) = self
            .with_cold_path(
                &summary,
                &request.feature,
                || self.store.authorize(&command),
                shortfall_of,
            )
            .await?;
        Ok(match outcome {
            AuthorizeOutcome::Held(placed) => Decision::Done(Authorized {
                hold_id,
                priced,
                draws: placed.draws,
                overdraft: placed.overdraft,
                expires_at: placed.expires_at,
                replayed: placed.replayed,
            }),
            AuthorizeOutcome::Refused(refusal) => Decision::Refused(self.refused(
                cold.summary(&summary),
                refusal,
                priced.cost,
                &cold,
                now,
            )),
        })
    }

    /// The account's balance now, for a reply after a decision that did not carry the region's
    /// figures (authorize, capture, release, reverse): one more read of the region. `None` when
    /// it cannot be read; the decision stands either way.
    pub async fn balance_after(&self, account: &AccountId) -> Option<Credits> {
        let now = self.clock.now();
        let summary = self.call_catalogue(account, now).await.ok().flatten()?;
        match self.figures(&summary, None).await {
            Ok(figures) => Some(figures.balance),
            Err(error) => {
                warn!(%account, %error, "balance after a decision not read");
                None
            }
        }
    }

    /// Captures `amount` of a hold, or all of it when `None`.
    pub async fn capture(
        &self,
        account: AccountId,
        key: IdempotencyKey,
        hold_id: HoldId,
        amount: Option<Credits>,
    ) -> Result<Decision<Captured>, EngineError> {
        let command = CaptureCommand {
            account,
            key,
            hold_id,
            amount,
            now: self.clock.now(),
        };
        Ok(match self.call(self.store.capture(&command)).await? {
            CaptureOutcome::Captured(captured) => Decision::Done(captured_of(captured)),
            CaptureOutcome::Refused(refusal) => Decision::Refused(Refused::Hold(refusal)),
        })
    }

    pub async fn release(
        &self,
        account: AccountId,
        key: IdempotencyKey,
        hold_id: HoldId,
    ) -> Result<Decision<Credits>, EngineError> {
        let command = ReleaseCommand {
            account,
            key,
            hold_id,
            now: self.clock.now(),
        };
        Ok(match self.call(self.store.release(&command)).await? {
            ReleaseOutcome::Released { amount, .. } => Decision::Done(amount),
            ReleaseOutcome::Refused(refusal) => Decision::Refused(Refused::Hold(refusal)),
        })
    }

    /// Undoes the caller's own debit, named by its idempotency key, within the window.
    pub async fn reverse(
        &self,
        account: AccountId,
        key: IdempotencyKey,
        debit_key: IdempotencyKey,
    ) -> Result<Decision<Credits>, EngineError> {
        // A cached decision may still be waiting in this edge's buffer: flush it first. If it
        // is still waiting after (the region did not answer the flush), the region cannot know
        // the debit yet: "unknown debit" would be wrong, so the caller is asked to retry.
        self.leases.flush_account(&account).await;
        if self.leases.is_unflushed(&account, &debit_key) {
            return Err(EngineError::Unavailable(format!(
                "debit {debit_key} is not recorded in the region yet (its flush did not complete); retry the reversal"
            )));
        }
        let command = ReverseCommand {
            account,
            key,
            debit_key,
            now: self.clock.now(),
            window_ms: self.settings.reverse_window_ms,
        };
        Ok(match self.call(self.store.reverse(&command)).await? {
            ReverseOutcome::Reversed { amount, .. } => Decision::Done(amount),
            ReverseOutcome::Refused(refusal) => Decision::Refused(Refused::Reverse(refusal)),
        })
    }

    /// The account's balance, what it can spend now (on `feature` when given) and what this
    /// region alone can spend, from one view of the region and the account's summary.
    async fn figures(
        &self,
        summary: &Arc<AccountSummary>,
        feature: Option<&FeatureKey>,
    ) -> Result<Figures, EngineError> {
        let now = self.clock.now();
        let account = &summary.account;
        let (unflushed, view) = self
            .leases
            .with_unflushed(account, self.call(self.store.view(account, now)))
            .await;
        let view = view?;
        let matching = self.summary_matching(summary, Some(view.moves)).await;
        let summary = matching.as_ref();
        let (credits, room) = Self::region_credits(unflushed, &view, now);
        let balance = account_balance(summary, credits, room, now);
        let segments = view
            .segments
            .iter()
            .filter(|s| s.is_active_at(now) && feature.is_none_or(|f| s.scope.covers(f)))
            .map(|s| s.remaining);
        let leased = self.leases.available(account, feature, now);
        let active = view
            .segments
            .iter()
            .filter(|s| s.is_active_at(now))
            .map(|s| s.remaining);
        let seen = Credits::checked_sum(active).unwrap_or(Credits::MAX);
        self.remember_seen(account, self.seen_credits(account, seen, now), room);
        let region_available =
            Credits::checked_sum(segments.chain([room, leased])).unwrap_or(Credits::MAX);
        // The account's overdraft room: its limit less its debt as this region sees it.
        let debt = debt_seen(summary, room);
        let account_room = summary.overdraft_limit.saturating_sub_floor_zero(debt);
        let outside = summary.outside_at(now, feature);
        let region_spendable = region_available.saturating_sub_floor_zero(room);
        let available =
            Credits::checked_sum([region_spendable, outside, account_room]).unwrap_or(Credits::MAX);
        Ok(Figures {
            summary: Arc::clone(&matching),
            balance,
            available,
            region_available,
            held: view.held,
        })
    }

    pub async fn quote(
        &self,
        account: AccountId,
        feature: FeatureKey,
        spend: Spend,
    ) -> Result<Decision<Quote>, EngineError> {
        let now = self.clock.now();
        let Some(summary) = self.summary(&account, Some(&feature)).await? else {
            return Ok(Decision::Refused(Refused::UnknownAccount(account)));
        };
        self.ensure_prices(spend).await?;
        let priced = match self.price(&summary, &feature, spend, now)? {
            Ok(priced) => priced,
            Err(refused) => return Ok(Decision::Refused(refused)),
        };
        let figures = self.figures(&summary, Some(&feature)).await?;
        Ok(Decision::Done(Quote {
            priced,
            available: figures.available,
            affordable: priced.cost <= figures.available,
        }))
    }

    pub async fn balance(
        &self,
        account: AccountId,
        feature: Option<FeatureKey>,
    ) -> Result<Decision<BalanceView>, EngineError> {
        let Some(summary) = self.summary(&account, feature.as_ref()).await? else {
            return Ok(Decision::Refused(Refused::UnknownAccount(account)));
        };
        let figures = self.figures(&summary, feature.as_ref()).await?;
        Ok(Decision::Done(BalanceView {
            summary: figures.summary,
            balance: figures.balance,
            available: figures.available,
            region_available: figures.region_available,
            held: figures.held,
        }))
    }
}

fn captured_of(captured: tollgate_region::Captured) -> Captured {
    let total = Credits::checked_sum(
        captured
            .draws
            .iter()
            .map(|d| d.amount)
            .chain([captured.overdraft]),
    )
    .unwrap_or(Credits::MAX);
    Captured {
        captured: total,
        released: captured.released,
        usage_id: captured.usage_id,
        replayed: captured.replayed,
    }
}

fn refused_of(refusal: Refusal, cost: Credits) -> Refused {
    match refusal {
        Refusal::Insufficient {
            available,
            shortfall,
        } => Refused::Insufficient {
            cost,
            available,
            shortfall,
        },
        Refusal::RateLimited {
            feature,
            retry_after_ms,
        } => Refused::RateLimited {
            feature,
            retry_after_ms,
        },
    }
}

/// The hold an `Authorize` under `key` places: Capture and Release may name a hold by the
/// caller's key instead of by its id.
pub fn hold_id_for_key(key: &IdempotencyKey) -> Result<HoldId, tollgate_core::IdError> {
    HoldId::new(format!("h.{}", hex_digest(key.as_str())))
}

/// A short, stable, id-safe digest of a caller's key (FNV-1a, 64 bits, twice with two seeds).
fn hex_digest(text: &str) -> String {
    let fnv = |seed: u64| {
        text.bytes().fold(seed, |hash, byte| {
            (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
        })
    };
    format!(
        "{:016x}{:016x}",
        fnv(0xcbf2_9ce4_8422_2325),
        fnv(0x6c62_272e_07bb_0142)
    )
}
