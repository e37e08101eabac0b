//! The decisions: price a request from memory, then spend in strict mode (one atomic call on the
//! regional store) or cached mode (the edge's in-memory lease). The gRPC and gateway adapters
//! only decode, call this, and encode.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use tollgate_core::{
    AccountId, ActorId, Credits, Draw, FeatureKey, HoldId, IdempotencyKey, PriceRule, Quantity,
    Rate, Timestamp,
};
use tollgate_region::{
    check_amount, AccountSummary, AuthorizeCommand, AuthorizeOutcome, CaptureCommand,
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
    /// 0 when the caller named the cost.
    pub version: u64,
    pub rule: PriceRule,
}

impl Priced {
    fn tag(&self) -> PriceTag {
        PriceTag {
            version: self.version,
            rule: self.rule,
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
    /// What can be spent now in this region: segments (all, or those covering the feature),
    /// this edge's lease, and overdraft room.
    pub available: Credits,
    pub held: Credits,
}

/// The cold path: asks the authority for an allocation in this region. Returns whether the
/// account exists.
pub trait AllocationRequester: Send + Sync + 'static {
    fn request_allocation<'a>(
        &'a self,
        account: &'a AccountId,
        feature: Option<&'a FeatureKey>,
    ) -> Pin<Box<dyn Future<Output = Result<bool, EngineError>> + Send + 'a>>;
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
}

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
        if self.asked.len() >= COLD_PATH_ANSWERS_MAX {
            let ttl = self.settings.unknown_account_ttl_ms;
            self.asked.retain(|_, cell| {
                cell.try_lock().map_or(true, |answer| {
                    answer.is_some_and(|a| arrived_ms - a.at_ms < ttl)
                })
            });
        }
        let cell = Arc::clone(
            self.asked
                .entry(account.clone())
                .or_insert_with(|| Arc::new(tokio::sync::Mutex::new(None)))
                .value(),
        );
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
        match allocator.request_allocation(account, feature).await {
            Ok(exists) => {
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

    /// Runs a spending call on the regional store. When the region has nothing for the account
    /// (the cold path), asks the authority once for an allocation and runs the call again.
    async fn with_cold_path<T, F, Fut>(
        &self,
        account: &AccountId,
        feature: &FeatureKey,
        call: F,
        nothing_here: impl Fn(&T) -> bool,
    ) -> Result<T, EngineError>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<T, tollgate_region::RegionError>>,
    {
        let outcome = self.call(call()).await?;
        if nothing_here(&outcome) && self.ask_authority(account, Some(feature)).await? {
            return self.call(call()).await;
        }
        Ok(outcome)
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
            return self.debit_cached(&request, &priced, at).await;
        }
        self.debit_strict(&request, &priced, at).await
    }

    async fn debit_strict(
        &self,
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
        };
        let nothing_here = |o: &DebitOutcome| matches!(o, DebitOutcome::Refused(Refusal::Insufficient { available, .. }) if available.is_zero());
        let outcome = self
            .with_cold_path(
                &request.account,
                &request.feature,
                || self.store.debit(&command),
                nothing_here,
            )
            .await?;
        Ok(match outcome {
            DebitOutcome::Allowed(allowed) => Decision::Done(Debited {
                priced: *priced,
                available_after: allowed.pool,
                draws: allowed.draws,
                overdraft: allowed.overdraft,
                usage_id: Some(allowed.usage_id),
                mode: EnforcementMode::Strict,
                replayed: allowed.replayed,
            }),
            DebitOutcome::Refused(refusal) => Decision::Refused(refused_of(refusal, priced.cost)),
        })
    }

    async fn debit_cached(
        &self,
        request: &DebitRequest,
        priced: &Priced,
        at: Timestamp,
    ) -> Result<Decision<Debited>, EngineError> {
        // A cold account (no lease here yet) is decided in one strict call while the lease is
        // taken in the background: a long tail of accounts seen once never waits for a lease.
        if !self.leases.holds(&request.account) {
            self.leases.warm(&request.account);
            let strict = self.debit_strict(request, priced, at).await?;
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
            }),
            LeaseDecision::Insufficient { available } => Decision::Refused(Refused::Insufficient {
                cost: priced.cost,
                available,
                shortfall: priced.cost.saturating_sub_floor_zero(available),
            }),
        })
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
        let hold_id = HoldId::new(format!("h.{}", hex_digest(request.key.as_str())))
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
        let nothing_here = |o: &AuthorizeOutcome| matches!(o, AuthorizeOutcome::Refused(Refusal::Insufficient { available, .. }) if available.is_zero());
        let outcome = self
            .with_cold_path(
                &request.account,
                &request.feature,
                || self.store.authorize(&command),
                nothing_here,
            )
            .await?;
        Ok(match outcome {
            AuthorizeOutcome::Held(placed) => Decision::Done(Authorized {
                hold_id,
                priced,
                expires_at: placed.expires_at,
                replayed: placed.replayed,
            }),
            AuthorizeOutcome::Refused(refusal) => {
                Decision::Refused(refused_of(refusal, priced.cost))
            }
        })
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
        // A cached decision may still be waiting in this edge's buffer: flush it first.
        self.leases.flush_account(&account).await;
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

    /// What the account can spend now in this region, on `feature` when given.
    async fn available(
        &self,
        account: &AccountId,
        feature: Option<&FeatureKey>,
    ) -> Result<(Credits, Credits), EngineError> {
        let now = self.clock.now();
        let view = self.call(self.store.view(account, now)).await?;
        let segments = view
            .segments
            .iter()
            .filter(|s| s.is_active_at(now) && feature.is_none_or(|f| s.scope.covers(f)))
            .map(|s| s.remaining);
        let room = view
            .overdraft_limit
            .saturating_sub_floor_zero(view.overdraft_used);
        let leased = self.leases.available(account, feature, now);
        let available =
            Credits::checked_sum(segments.chain([room, leased])).unwrap_or(Credits::MAX);
        Ok((available, view.held))
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
        let (available, _) = self.available(&account, Some(&feature)).await?;
        Ok(Decision::Done(Quote {
            priced,
            available,
            affordable: priced.cost <= available,
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
        let (available, held) = self.available(&account, feature.as_ref()).await?;
        Ok(Decision::Done(BalanceView {
            summary,
            available,
            held,
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
