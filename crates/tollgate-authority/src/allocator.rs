//! Allocation: slices of an account's grants handed to regions.
//!
//! Per region and account the target is what the recent burn rate spends over
//! `allocation_horizon_ms`, or a few spends of the size the region has seen if that is more,
//! within `[allocation_micros_min, allocation_micros_max]`. A region is refilled when the pool
//! its usage stream reports falls under `low_water_percent` of the target or cannot pay one
//! spend of that size, answered when it asks for a cold account, and emptied when idle.
//!
//! The invariant: for every grant, what the ledger says remains is at least what the regions
//! hold of it or have spent without the ledger knowing yet (`installed − taken back − spent`,
//! per region, from the authority's counters), and the overdraft room handed out never
//! exceeds the account's limit less its debt. Counters move *before* credits are installed and
//! *after* they are taken back, so a crash in between leaves the authority believing regions
//! hold more than they do: it may under-allocate until the grant ends, never over-allocate.

use std::collections::BTreeMap;

use tollgate_core::command::{Memo, SettleDebt};
use tollgate_core::{
    burn_order, AccountId, Credits, FeatureKey, Grant, GrantState, RegionId, Timestamp,
};
use tollgate_ledger::{LedgerError, LedgerStore};
use tollgate_region::{AccountSummary, RegionError, RegionStore, Segment, SegmentSpec};
use tracing::{debug, warn};

use crate::authority::Authority;
use crate::error::{AuthorityError, Result};
use crate::reconciler::{derived_key, Overdrawn};
use crate::settings::{
    ALLOCATION_GRANTS_FIRST, ALLOCATION_SEGMENTS_MAX, SUMMARY_OUTSIDE_GROUPS_MAX,
    SWEEP_ACCOUNTS_PER_PASS_MAX,
};
use crate::state::{AllocationRow, InstallIntent};

/// Install intents one recovery pass settles at most.
pub const RECOVER_INSTALLS_PER_PASS_MAX: u32 = 1_000;

/// What a region holds for an account after an allocation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Allocation {
    pub account: AccountId,
    pub region: RegionId,
    pub segments: Vec<Segment>,
    pub overdraft_room: Credits,
    pub mode: tollgate_region::EnforcementMode,
    pub generation: u64,
    /// Credits of the account's grants effective now (covering the feature asked for, when
    /// one was) that no region holds after this allocation: zero means the authority has
    /// nothing more to hand out until something changes (a grant, a refund, a take-back).
    pub unallocated: Credits,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AllocationOutcome {
    Allocated(Allocation),
    /// The ledger does not know the account; the edge caches the answer for a short while.
    UnknownAccount,
}

/// Why an allocation adds credits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Reason {
    /// The region asked (cold path): bring it to its target.
    Requested,
    /// The pool fell under the low-water mark.
    Refill,
}

impl<L: LedgerStore + ?Sized, R: RegionStore> Authority<L, R> {
    /// Answers a region's request (the cold path): installs slices up to the region's target
    /// and at least `needed` (what a spend the region could not pay is short of), moving
    /// credits from idle regions when the authority holds too few, publishes the account's
    /// summary there, and says what the region holds.
    pub async fn request_allocation(
        &self,
        region: &RegionId,
        account: &AccountId,
        feature: Option<&FeatureKey>,
        needed: Credits,
    ) -> Result<AllocationOutcome> {
        self.allocate(region, account, feature, Reason::Requested, needed.micros())
            .await
    }

    /// Refills a region whose pool for the account fell under the low-water mark.
    pub async fn refill_if_low(&self, region: &RegionId, account: &AccountId) -> Result<()> {
        let Some(seen) = self.state.region_account(region, account).await? else {
            return Ok(());
        };
        let target = self.target_micros(seen.burn_micros_per_s, seen.spend_micros);
        // Refilled while the region can still pay the next spend of the size it sees.
        if seen.pool < self.settings.low_water_micros(target, seen.spend_micros) {
            self.allocate(region, account, None, Reason::Refill, 0)
                .await?;
        }
        Ok(())
    }

    /// Tops up every region that holds an allocation for the account (after a new grant, a
    /// settled debt or a raised limit), so new credits reach where they are spent.
    pub async fn rebalance(&self, account: &AccountId) -> Result<()> {
        let regions: Vec<RegionId> = self.regions.keys().cloned().collect();
        for region in &regions {
            if self.state.region_account(region, account).await?.is_some() {
                self.allocate(region, account, None, Reason::Requested, 0)
                    .await?;
            } else {
                self.publish_summary(region, account).await?;
            }
        }
        Ok(())
    }

    /// What a region should hold for an account, from its burn rate and the size of its
    /// recent spends there (see `AuthoritySettings::allocation_target_micros`). With one region
    /// there is nothing to share: the region holds everything spendable, so its answer is the
    /// account's.
    fn target_micros(&self, burn_micros_per_s: i64, spend_micros: i64) -> i64 {
        if self.regions.len() == 1 {
            return tollgate_region::REGION_MICROS_MAX;
        }
        self.settings
            .allocation_target_micros(burn_micros_per_s, spend_micros)
    }

    /// [`Self::allocate_now`], timed for `/metrics` from the call to the answer (waiting for
    /// the account's lock included: that is what the region waits).
    async fn allocate(
        &self,
        region: &RegionId,
        account: &AccountId,
        feature: Option<&FeatureKey>,
        reason: Reason,
        needed: i64,
    ) -> Result<AllocationOutcome> {
        // A duration, not a moment of the credit lifecycle: measured on the monotonic clock,
        // not on the authority's `Clock` (which tests move by hand).
        let started = std::time::Instant::now();
        let outcome = self
            .allocate_now(region, account, feature, reason, needed)
            .await;
        let reason = match reason {
            Reason::Requested => "requested",
            Reason::Refill => "refill",
        };
        self.metrics
            .observe_allocation(region, reason, outcome.is_ok(), started.elapsed());
        outcome
    }

    async fn allocate_now(
        &self,
        region: &RegionId,
        account: &AccountId,
        feature: Option<&FeatureKey>,
        reason: Reason,
        needed: i64,
    ) -> Result<AllocationOutcome> {
        let lock = self.account_lock(account);
        let _held = lock.lock().await;
        let store = self.region(region)?;
        let now = self.clock.now();
        let snapshot = match self.ledger.account(account).await {
            Ok(snapshot) => snapshot,
            Err(LedgerError::UnknownAccount(_)) => return Ok(AllocationOutcome::UnknownAccount),
            Err(other) => return Err(other.into()),
        };
        // An install lost on its way counts as allocated until its intent is settled: replay
        // the account's open intents first, so that what the region is short of is not
        // mistaken for credits it holds.
        for intent in self
            .state
            .open_installs_of(region, account, RECOVER_INSTALLS_PER_PASS_MAX)
            .await?
        {
            self.settle_intent(store.as_ref(), &intent, now).await?;
        }
        let view = store
            .view(account, now)
            .await
            .map_err(|e| AuthorityError::region(region, e))?;
        let (burn, spend) = self
            .state
            .region_account(region, account)
            .await?
            .map_or((0, 0), |seen| (seen.burn_micros_per_s, seen.spend_micros));
        // Only segments that can be spent now count: a grant that ended, or one not yet
        // effective, still shows its remainder.
        let pool: i64 = view
            .segments
            .iter()
            .filter(|s| s.is_active_at(now))
            .map(|s| s.remaining.micros())
            .sum();
        let need = (self.target_micros(burn, spend) - pool).max(needed);
        let generation = self.state.note_allocation(region, account, now).await?;
        let mut rows = self.state.allocations(account).await?;
        let mut unallocated = 0;
        // What the credits installed leave of the spend asked for: overdraft room may pay it.
        let mut uncovered = needed.max(0);
        if need > 0 {
            let (mut slices, mut free) =
                self.slices_for(account, &rows, feature, need, now).await?;
            let cut = slices_total(&slices);
            if cut < needed && self.regions.len() > 1 {
                // The authority holds too few: bring back what idle regions hold, then cut again.
                let moved = self
                    .move_from_idle_regions(region, account, feature, needed - cut, now)
                    .await?;
                if moved > 0 {
                    rows = self.state.allocations(account).await?;
                    (slices, free) = self.slices_for(account, &rows, feature, need, now).await?;
                }
            }
            for spec in &slices {
                self.install(region, account, spec, generation, now).await?;
            }
            let covering: i64 = slices
                .iter()
                .filter(|s| feature.is_none_or(|f| s.scope.covers(f)))
                .map(|s| s.amount.micros())
                .sum();
            uncovered = (needed - covering).max(0);
            unallocated = (free - slices_total(&slices)).max(0);
            debug!(%region, %account, ?reason, slices = slices.len(), "allocated");
        }
        let (room, room_left) = self
            .grant_overdraft(region, &snapshot, &view, &rows, uncovered, now)
            .await?;
        // Overdraft room the authority still holds can pay a spend too: "nothing more" means
        // neither credits nor room.
        unallocated += room_left;
        self.publish_summary_held(region, account).await?;
        let view = store
            .view(account, now)
            .await
            .map_err(|e| AuthorityError::region(region, e))?;
        let settings = self.state.account_settings(account).await?;
        Ok(AllocationOutcome::Allocated(Allocation {
            account: account.clone(),
            region: region.clone(),
            segments: view.segments,
            overdraft_room: room,
            mode: settings.mode,
            generation,
            unallocated: Credits::from_micros(unallocated),
        }))
    }

    /// Takes back, for a region short of `want`, what other regions hold of the account's
    /// grants (covering `feature`) when they have not used the account for `move_idle_ms` and
    /// their usage of it is reconciled (checked by the region in the take-back itself, as for
    /// idle take-backs). Returns the micro-credits taken back. A region in use keeps its
    /// credits: moving them would only make it ask back.
    async fn move_from_idle_regions(
        &self,
        to: &RegionId,
        account: &AccountId,
        feature: Option<&FeatureKey>,
        want: i64,
        now: Timestamp,
    ) -> Result<i64> {
        let idle_before = now.millis() - self.settings.move_idle_ms;
        let mut moved = 0;
        let donors: Vec<RegionId> = self.regions.keys().filter(|r| *r != to).cloned().collect();
        for donor in &donors {
            let Some(seen) = self.state.region_account(donor, account).await? else {
                continue;
            };
            if seen.last_usage_ms >= idle_before || seen.last_allocation_ms >= idle_before {
                continue;
            }
            let store = self.region(donor)?;
            let Ok(view) = store.view(account, now).await else {
                // A region cut off keeps what it holds.
                continue;
            };
            let reconciled = self.state.usage_seq(donor, account).await?;
            if view.usage_seq > reconciled {
                continue;
            }
            for segment in view
                .segments
                .iter()
                .filter(|s| s.is_active_at(now) && feature.is_none_or(|f| s.scope.covers(f)))
            {
                let taken = self
                    .take_back_grant(donor, account, &segment.grant_id, Some(reconciled), now)
                    .await?;
                moved += taken.taken.micros();
                if taken.unreconciled > 0 || moved >= want {
                    break;
                }
            }
            // The donor's balance did not change, only where its credits are: say so there.
            self.publish_summary_held(donor, account).await?;
            if moved >= want {
                break;
            }
        }
        if moved > 0 {
            debug!(%to, %account, moved, "credits moved from idle regions");
        }
        Ok(moved)
    }

    /// [`cut_slices`] over the account's grants holding credits, read from the first in
    /// burn-down order: the rest are read only when the first ones cannot decide
    /// ([`slices_from_first`]), so an account with many grants costs what its allocation uses.
    async fn slices_for(
        &self,
        account: &AccountId,
        rows: &[AllocationRow],
        feature: Option<&FeatureKey>,
        need: i64,
        now: Timestamp,
    ) -> Result<(Vec<SegmentSpec>, i64)> {
        let mut first = self
            .ledger
            .grants_with_credits(account, ALLOCATION_GRANTS_FIRST)
            .await?;
        let read = first.len();
        // A grant being closed is handed out to nobody (see `closing`).
        first.retain(|grant| !self.is_closing(account, &grant.id));
        if read < ALLOCATION_GRANTS_FIRST {
            let free = free_micros(&first, rows, feature, now);
            return Ok((cut_slices(&first, rows, feature, need, now), free));
        }
        if let Some(slices) = slices_from_first(&first, rows, feature, need, now) {
            // Decided by the first grants: the need is met, so what is left is not asked for.
            let free = free_micros(&first, rows, feature, now);
            return Ok((slices, free));
        }
        let mut all = self
            .ledger
            .grants_with_credits(account, tollgate_ledger::OPEN_GRANTS_MAX)
            .await?;
        all.retain(|grant| !self.is_closing(account, &grant.id));
        let free = free_micros(&all, rows, feature, now);
        Ok((cut_slices(&all, rows, feature, need, now), free))
    }

    pub(crate) fn region(&self, region: &RegionId) -> Result<&std::sync::Arc<R>> {
        self.regions
            .get(region)
            .ok_or_else(|| AuthorityError::NotFound(format!("region {region}")))
    }

    async fn install(
        &self,
        region: &RegionId,
        account: &AccountId,
        spec: &SegmentSpec,
        generation: u64,
        now: Timestamp,
    ) -> Result<()> {
        let store = self.region(region)?;
        // Unique per install (a region's allocation generation starts again after an idle
        // take-back); the intent keeps the key, so a replay after a crash reuses it.
        let mut nonce = [0_u8; 8];
        getrandom::fill(&mut nonce)
            .map_err(|e| AuthorityError::Corrupt(format!("no randomness for a key: {e}")))?;
        let key = derived_key(
            "alloc",
            &[
                region.as_str(),
                account.as_str(),
                spec.grant_id.as_str(),
                &generation.to_string(),
                &hex::encode(nonce),
            ],
        )?;
        // Counted first, with an intent: a crash before the region answers leaves the counter
        // high (the safe side) until `recover_installs` replays or cancels the intent.
        let intent = InstallIntent {
            key,
            region: region.clone(),
            account: account.clone(),
            spec: spec.clone(),
            created_at: now,
        };
        self.state.begin_install(&intent).await?;
        self.finish_install(store.as_ref(), &intent, now).await
    }

    /// Calls the region for an install whose intent is recorded, then settles the intent:
    /// done when the region installed it (now or on an earlier try, the key makes it
    /// idempotent), uncounted when the region refused it for good, left open on a fault.
    async fn finish_install(
        &self,
        store: &R,
        intent: &InstallIntent,
        now: Timestamp,
    ) -> Result<()> {
        match store
            .install_segment(&intent.account, &intent.key, &intent.spec, now)
            .await
        {
            Ok(_) => self.state.finish_install(intent.key.as_str()).await,
            Err(
                error @ (RegionError::PoolFull { .. }
                | RegionError::OutOfRange { .. }
                | RegionError::IdempotencyConflict),
            ) => {
                self.state.cancel_install(intent, true).await?;
                Err(AuthorityError::region(&intent.region, error))
            }
            Err(error) => Err(AuthorityError::region(&intent.region, error)),
        }
    }

    /// Settles one open install intent (the account's lock held): replays it with its key
    /// while the region still remembers keys, else drops it keeping the counter. Returns
    /// whether it is settled; a region still unreachable leaves it open for the next try.
    async fn settle_intent(
        &self,
        store: &R,
        intent: &InstallIntent,
        now: Timestamp,
    ) -> Result<bool> {
        let age = now.millis() - intent.created_at.millis();
        if age >= store.retain_ms() {
            warn!(region = %intent.region, account = %intent.account, key = %intent.key,
                "install intent older than the region's idempotency retention; counter kept");
            self.state.cancel_install(intent, false).await?;
            return Ok(true);
        }
        match self.finish_install(store, intent, now).await {
            Ok(()) => Ok(true),
            Err(AuthorityError::Region { .. }) => Ok(!self.state.install_open(intent).await?),
            Err(other) => Err(other),
        }
    }

    /// Settles install intents a crash or a regional fault left open. An intent younger than
    /// the region's idempotency retention is replayed with its key (a second install is
    /// impossible); an older one cannot be told apart from a done install, so its counter is
    /// kept (the safe side: the region may be under-allocated, never over) and it is dropped.
    /// Returns how many intents were settled.
    pub async fn recover_installs(&self) -> Result<usize> {
        let now = self.clock.now();
        let mut settled = 0;
        for intent in self
            .state
            .open_installs(RECOVER_INSTALLS_PER_PASS_MAX)
            .await?
        {
            let Ok(store) = self.region(&intent.region) else {
                // A region no longer configured: nothing can be installed there any more.
                self.state.cancel_install(&intent, false).await?;
                settled += 1;
                continue;
            };
            let lock = self.account_lock(&intent.account);
            let _held = lock.lock().await;
            if self.settle_intent(store.as_ref(), &intent, now).await? {
                settled += 1;
            }
        }
        Ok(settled)
    }

    /// Gives the region overdraft room up to an equal share of the account's limit less its
    /// debt, within what the other regions do not already hold; beyond its share when a spend
    /// asked for (`uncovered`) needs it, so that no overdraft room the authority still holds is
    /// refused to a region that must pay. Returns the region's room and the room the authority
    /// still holds for the account.
    async fn grant_overdraft(
        &self,
        region: &RegionId,
        snapshot: &tollgate_ledger::AccountSnapshot,
        view: &tollgate_region::AccountView,
        rows: &[AllocationRow],
        uncovered: i64,
        now: Timestamp,
    ) -> Result<(Credits, i64)> {
        let account = &snapshot.account;
        let room_now = view
            .overdraft_limit
            .saturating_sub_floor_zero(view.overdraft_used);
        let outstanding: i64 = rows
            .iter()
            .filter(|r| r.grant_id.is_empty())
            .map(|r| r.outstanding().max(0))
            .sum();
        let free = snapshot.overdraft_limit.micros() - snapshot.debt.micros() - outstanding;
        let regions = i64::try_from(self.regions.len()).unwrap_or(i64::MAX).max(1);
        let share = snapshot.overdraft_limit.micros() / regions;
        if room_now.micros() > share && uncovered == 0 {
            // Above its share (the limit was lowered, or a spend took room beyond the share
            // earlier) and no spend needs it now: give back the room above the share.
            let limit = Credits::from_micros(view.overdraft_used.micros() + share);
            self.region(region)?
                .set_overdraft_limit(account, limit, now)
                .await
                .map_err(|e| AuthorityError::region(region, e))?;
            let given_back = room_now.micros() - share;
            self.state
                .add_taken_back(region, account, "", given_back)
                .await?;
            return Ok((Credits::from_micros(share), (free + given_back).max(0)));
        }
        // `uncovered` is beyond what the region could pay, its room included.
        let wanted = (share - room_now.micros()).max(uncovered);
        let add = free.min(wanted).max(0);
        if add == 0 {
            return Ok((room_now, free.max(0)));
        }
        self.state.add_installed(region, account, "", add).await?;
        let limit = Credits::from_micros(view.overdraft_limit.micros() + add);
        self.region(region)?
            .set_overdraft_limit(account, limit, now)
            .await
            .map_err(|e| AuthorityError::region(region, e))?;
        Ok((Credits::from_micros(room_now.micros() + add), free - add))
    }

    /// Publishes the account's summary (plan, mode, balance, overdraft limit, the credits the
    /// region does not hold and the debt basis) to one region, under the account's lock.
    pub async fn publish_summary(&self, region: &RegionId, account: &AccountId) -> Result<()> {
        let lock = self.account_lock(account);
        let _held = lock.lock().await;
        self.publish_summary_held(region, account).await
    }

    /// [`Self::publish_summary`] by a caller holding the account's lock. Every move of credits
    /// or overdraft room in or out of a region happens under that lock, so the region's move
    /// count the store stamps on the summary as it publishes is the count its figures were
    /// computed at (edges compare it with the count their decisions read, docs/answer.md).
    pub(crate) async fn publish_summary_held(
        &self,
        region: &RegionId,
        account: &AccountId,
    ) -> Result<()> {
        let snapshot = self.ledger.account(account).await?;
        let settings = self.state.account_settings(account).await?;
        let rows = self.state.allocations(account).await?;
        let grants = self
            .ledger
            .grants_with_credits(account, tollgate_ledger::OPEN_GRANTS_MAX)
            .await?;
        let (outside, debt_basis) = outside_of(region, &grants, &rows, &snapshot);
        let summary = AccountSummary {
            account: account.clone(),
            created_at: snapshot.created_at,
            plan: settings.plan,
            mode: settings.mode,
            contracts: self.state.contracts(account).await?,
            balance: snapshot.balance,
            overdraft_limit: snapshot.overdraft_limit,
            rate_limited: Default::default(),
            published_at: self.clock.now(),
            outside,
            debt_basis,
            region_moves: 0,
        };
        self.region(region)?
            .publish_account(&summary)
            .await
            .map_err(|e| AuthorityError::region(region, e))
    }

    /// Publishes the account's summary to every region.
    pub async fn publish_summary_everywhere(&self, account: &AccountId) -> Result<()> {
        let regions: Vec<RegionId> = self.regions.keys().cloned().collect();
        for region in &regions {
            self.publish_summary(region, account).await?;
        }
        Ok(())
    }

    /// Takes back what a region holds of one grant (all of it), counting it given back. With
    /// `reconciled`, nothing is taken while the region has usage of the account beyond it.
    pub(crate) async fn take_back_grant(
        &self,
        region: &RegionId,
        account: &AccountId,
        grant: &tollgate_core::GrantId,
        reconciled: Option<u64>,
        now: Timestamp,
    ) -> Result<tollgate_region::TakenBack> {
        let all = Credits::from_micros(tollgate_region::REGION_MICROS_MAX);
        self.take_back_part(region, account, grant, all, reconciled, now)
            .await
    }

    /// Takes back up to `amount` of what a region holds of one grant, counting it given back.
    pub(crate) async fn take_back_part(
        &self,
        region: &RegionId,
        account: &AccountId,
        grant: &tollgate_core::GrantId,
        amount: Credits,
        reconciled: Option<u64>,
        now: Timestamp,
    ) -> Result<tollgate_region::TakenBack> {
        let key = derived_key(
            "takeback",
            &[
                region.as_str(),
                account.as_str(),
                grant.as_str(),
                &now.millis().to_string(),
                &reconciled.map(|n| n.to_string()).unwrap_or_default(),
                &amount.micros().to_string(),
            ],
        )?;
        let taken = self
            .region(region)?
            .take_back(account, &key, grant, amount, reconciled, now)
            .await
            .map_err(|e| AuthorityError::region(region, e))?;
        if taken.taken.is_positive() {
            self.state
                .add_taken_back(region, account, grant.as_str(), taken.taken.micros())
                .await?;
        }
        Ok(taken)
    }

    /// Settles debt that usage ran up before a grant was issued when that usage reached the
    /// ledger only after the grant (`overdrawn`: the account's usage records in the ledger
    /// that ran into overdraft). The grant would have settled that debt had the usage arrived
    /// first (a grant settles the debt standing when it is issued), so the account's state
    /// would otherwise depend on the order its usage arrived in: the same balance, but debt
    /// standing beside the grant's credits, and less overdraft room for the features the grant
    /// does not cover.
    ///
    /// The grant's credits may be out in regions. What the authority still holds of them is
    /// settled first, then what regions give back of them, each only once its usage of the
    /// account is reconciled (a reversal not reconciled yet may have given draws back to the
    /// segment; see `take_back_idle`). The room the settled debt frees is handed out again at
    /// once (`rebalance`), so what a region can spend in total does not move. What cannot be
    /// settled while a region holding the grant's credits has usage of the account not
    /// reconciled yet is returned, to be tried again after a later reconciliation; the rest
    /// stays debt until the next grant settles it. One usage record settles from one grant
    /// once (the ledger key names both), so a batch applied again after a crash settles what
    /// the first pass did not and nothing twice.
    ///
    /// `tail` is for a batch being applied (see [`BatchTail`]): its region's credits may be
    /// taken back before the batch is all applied.
    pub async fn settle_late_debt(
        &self,
        account: &AccountId,
        overdrawn: &[Overdrawn],
        tail: Option<&BatchTail>,
    ) -> Result<Vec<Overdrawn>> {
        if overdrawn.is_empty() {
            return Ok(Vec::new());
        }
        let (waiting, moved) = {
            let lock = self.account_lock(account);
            let _held = lock.lock().await;
            self.settle_late_debt_locked(account, overdrawn, tail)
                .await?
        };
        if moved {
            self.rebalance(account).await?;
        }
        Ok(waiting)
    }

    /// [`Self::settle_late_debt`] under the account's lock: the usage left waiting, and
    /// whether anything moved (credits taken back or debt settled) so that regions must be
    /// topped up again.
    async fn settle_late_debt_locked(
        &self,
        account: &AccountId,
        overdrawn: &[Overdrawn],
        tail: Option<&BatchTail>,
    ) -> Result<(Vec<Overdrawn>, bool)> {
        let now = self.clock.now();
        let snapshot = match self.ledger.account(account).await {
            Ok(snapshot) => snapshot,
            Err(LedgerError::UnknownAccount(_)) => return Ok((Vec::new(), false)),
            Err(other) => return Err(other.into()),
        };
        let mut debt = snapshot.debt.micros();
        let Some(earliest) = overdrawn.iter().map(|usage| usage.at).min() else {
            return Ok((Vec::new(), false));
        };
        if debt <= 0 {
            return Ok((Vec::new(), false));
        }
        // Grants issued after the earliest such usage and in effect when issued (a grant not
        // in effect settles nothing; one past its expiry that the expiry run has not closed
        // yet does), in the order they were issued.
        let mut issued: Vec<(Timestamp, Grant)> = self
            .ledger
            .grant_records_with_credits(account, tollgate_ledger::OPEN_GRANTS_MAX)
            .await?
            .into_iter()
            .filter(|record| {
                record.grant.effective_at <= now
                    && record.created_at >= earliest
                    && record.grant.is_active_at(record.created_at)
            })
            .map(|record| (record.created_at, record.grant))
            .collect();
        if issued.is_empty() {
            return Ok((Vec::new(), false));
        }
        issued.sort_by(|a, b| a.0.cmp(&b.0).then_with(|| a.1.id.cmp(&b.1.id)));
        let mut rows = self.state.allocations(account).await?;
        let memo = Memo::new("debt run up before this grant was issued, reconciled after it")
            .map_err(|e| AuthorityError::invalid("memo", e))?;
        let (mut settled, mut moved) = (0_i64, false);
        let mut waiting = Vec::new();
        let mut sorted: Vec<&Overdrawn> = overdrawn.iter().collect();
        sorted.sort_by(|a, b| a.at.cmp(&b.at).then_with(|| a.debit.cmp(&b.debit)));
        // In event order the first grant issued after the usage settled its debt before any
        // issued later: while a region still holds that grant's credits (its usage of the
        // account unreconciled), a later grant (a refund grant that never expires, say) must
        // not settle the debt in its place, so the usage waits for the next batch.
        for usage in sorted {
            let mut left = usage.micros;
            let mut blocked = false;
            for (issued_at, grant) in issued.iter_mut() {
                if debt <= 0 || left <= 0 {
                    break;
                }
                if usage.at > *issued_at {
                    continue;
                }
                let owed = left.min(debt).min(grant.remaining.micros());
                if owed <= 0 {
                    continue;
                }
                let gathered = self
                    .gather(
                        account,
                        &grant.id,
                        grant.remaining.micros(),
                        owed,
                        &rows,
                        tail,
                        now,
                    )
                    .await?;
                if gathered.taken_back {
                    moved = true;
                    rows = self.state.allocations(account).await?;
                }
                blocked |= gathered.blocked;
                if gathered.micros <= 0 {
                    if gathered.blocked {
                        break;
                    }
                    continue;
                }
                let command = SettleDebt {
                    key: derived_key("settle", &[usage.debit.as_str(), grant.id.as_str()])?,
                    account: account.clone(),
                    grant: grant.id.clone(),
                    amount: Credits::from_micros(gathered.micros),
                    memo: memo.clone(),
                };
                let amount = match self.ledger.settle_debt(command, now).await {
                    Ok(Ok(receipt)) if !receipt.replayed => {
                        receipt.movements.iter().map(|m| m.amount.micros()).sum()
                    }
                    // Settled before, by a pass that applied this usage first.
                    Ok(Ok(_)) | Err(LedgerError::IdempotencyConflict { .. }) => 0,
                    // What was taken back stays with the authority and is handed out again.
                    Ok(Err(refusal)) => {
                        warn!(%account, grant = %grant.id, refusal = %refusal.message,
                            "the ledger settled no debt from a grant issued since");
                        0
                    }
                    Err(other) => return Err(other.into()),
                };
                settled += amount;
                debt -= amount;
                left -= amount;
                moved |= amount > 0;
                grant.remaining = Credits::from_micros(grant.remaining.micros() - amount);
                if gathered.blocked {
                    break;
                }
            }
            if blocked && left > 0 && debt > 0 {
                waiting.push(Overdrawn {
                    micros: left,
                    ..usage.clone()
                });
            }
        }
        if settled > 0 {
            debug!(%account, settled, "debt run up before a grant and reconciled after it, settled from it");
        }
        Ok((waiting, moved))
    }

    /// Gathers up to `owed` of a grant's credits for the ledger to settle debt from: what the
    /// authority holds of them first (the grant's `remaining` less what regions hold), then
    /// what regions give back.
    #[allow(clippy::too_many_arguments)]
    async fn gather(
        &self,
        account: &AccountId,
        grant: &tollgate_core::GrantId,
        remaining: i64,
        owed: i64,
        rows: &[AllocationRow],
        tail: Option<&BatchTail>,
        now: Timestamp,
    ) -> Result<Gathered> {
        let held_out: Vec<&AllocationRow> = rows
            .iter()
            .filter(|r| r.grant_id == grant.as_str() && r.outstanding() > 0)
            .collect();
        let out: i64 = held_out.iter().map(|r| r.outstanding()).sum();
        let mut gathered = Gathered {
            micros: (remaining - out).clamp(0, owed),
            taken_back: false,
            blocked: false,
        };
        for row in held_out {
            if gathered.micros >= owed {
                break;
            }
            let reconciled = match tail.filter(|t| t.region == row.region) {
                Some(tail) if tail.returns.get(grant).is_some_and(|r| *r > 0) => {
                    // A reversal still to apply gives some of it back: a debit after it
                    // could find the grant short.
                    gathered.blocked = true;
                    continue;
                }
                Some(tail) => tail.through_seq,
                None => self.state.usage_seq(&row.region, account).await?,
            };
            let taken = self
                .take_back_part(
                    &row.region,
                    account,
                    grant,
                    Credits::from_micros(owed - gathered.micros),
                    Some(reconciled),
                    now,
                )
                .await?;
            if taken.taken.is_positive() {
                gathered.taken_back = true;
                gathered.micros += taken.taken.micros();
            }
            gathered.blocked |= taken.unreconciled > 0;
        }
        Ok(gathered)
    }

    /// Takes back every allocation a region has not used for `idle_ms`: the region asks again
    /// (cold path) when the account comes back.
    ///
    /// Only once the region's usage of the account is all reconciled: a reversal gives its
    /// draws back to the region's segments at once, while the ledger counts them spent until
    /// it reconciles the debit and then the reversal. Credits taken back in between and
    /// allocated to another region could be spent and reconciled there first, and the debit
    /// would then find its grant empty. The region checks the condition in the take-back
    /// itself, so usage arriving after the view below is caught too.
    ///
    /// A region that fails a call is added to `failed` and skipped for the rest of the pass
    /// (its accounts wait for the next one); the other regions' accounts are taken back from.
    pub async fn take_back_idle(
        &self,
        failed: &mut std::collections::BTreeSet<RegionId>,
    ) -> Result<usize> {
        let now = self.clock.now();
        let idle_before = now.millis() - self.settings.idle_ms;
        let mut emptied = 0;
        for seen in self
            .state
            .region_accounts(SWEEP_ACCOUNTS_PER_PASS_MAX)
            .await?
        {
            if seen.last_usage_ms >= idle_before
                || seen.last_allocation_ms >= idle_before
                || failed.contains(&seen.region)
            {
                continue;
            }
            match self.take_back_idle_account(&seen, now).await {
                Ok(true) => emptied += 1,
                Ok(false) => {}
                Err(AuthorityError::Region { error, .. }) => {
                    warn!(region = %seen.region, %error, "idle take-back: the region did not answer");
                    failed.insert(seen.region.clone());
                }
                Err(other) => return Err(other),
            }
        }
        Ok(emptied)
    }

    /// [`Self::take_back_idle`] for one idle account in one region: whether it was emptied.
    async fn take_back_idle_account(
        &self,
        seen: &crate::state::RegionAccount,
        now: Timestamp,
    ) -> Result<bool> {
        let lock = self.account_lock(&seen.account);
        let _held = lock.lock().await;
        let Ok(store) = self.region(&seen.region) else {
            return Ok(false);
        };
        let view = store
            .view(&seen.account, now)
            .await
            .map_err(|e| AuthorityError::region(&seen.region, e))?;
        let reconciled = self.state.usage_seq(&seen.region, &seen.account).await?;
        if view.usage_seq > reconciled {
            debug!(region = %seen.region, account = %seen.account, "idle, but usage is not reconciled yet");
            return Ok(false);
        }
        for segment in &view.segments {
            let taken = self
                .take_back_grant(
                    &seen.region,
                    &seen.account,
                    &segment.grant_id,
                    Some(reconciled),
                    now,
                )
                .await?;
            if taken.unreconciled > 0 {
                // Usage arrived since the view: try again on a later pass.
                return Ok(false);
            }
        }
        let room = view
            .overdraft_limit
            .saturating_sub_floor_zero(view.overdraft_used);
        if room.is_positive() {
            store
                .set_overdraft_limit(&seen.account, view.overdraft_used, now)
                .await
                .map_err(|e| AuthorityError::region(&seen.region, e))?;
            self.state
                .add_taken_back(&seen.region, &seen.account, "", room.micros())
                .await?;
        }
        self.state
            .forget_region_account(&seen.region, &seen.account)
            .await?;
        // What the region held is the authority's again: the region's summary says so, so
        // its edges go on telling the same balance.
        self.publish_summary_held(&seen.region, &seen.account)
            .await?;
        Ok(true)
    }
}

/// The part of a usage batch still to apply for one account, when debt is settled before the
/// batch is all applied (before a reversal's refund, which pays debt back first). A region
/// gives back what its records so far left of a grant as long as nothing beyond the batch has
/// come (`through_seq`, the account's last sequence number in the batch) and no reversal still
/// to apply gives credits of that grant back (`returns`): a reversal is the one record that
/// puts credits back in the region before the ledger counts them, so a debit after it could
/// otherwise find the grant short. Debits still to apply already took their draws out of the
/// region's segment, so what is taken back leaves the ledger enough for them.
pub struct BatchTail {
    pub region: RegionId,
    pub through_seq: u64,
    /// Micro-credits per grant id that the reversals still to apply give back.
    pub returns: BTreeMap<tollgate_core::GrantId, i64>,
}

/// Credits gathered for settling debt from a grant, and whether regions gave any back.
struct Gathered {
    micros: i64,
    taken_back: bool,
    /// A region holding the grant's credits had usage of the account not reconciled yet.
    blocked: bool,
}

/// What a region's summary says of the credits it does not hold: per open grant, what the
/// ledger says remains less what this region holds of it or has spent unreconciled, grouped by
/// terms; and the debt basis, the ledger's debt plus the overdraft room this region has
/// outstanding. Both stay put while this region decides and is reconciled (see
/// `AccountSummary::outside`). Past `SUMMARY_OUTSIDE_GROUPS_MAX` groups the rest is left out
/// (the balance an edge tells is then low, never high) and a warning says so.
fn outside_of(
    region: &RegionId,
    grants: &[Grant],
    rows: &[AllocationRow],
    snapshot: &tollgate_ledger::AccountSnapshot,
) -> (Vec<tollgate_region::OutsideCredits>, Credits) {
    let here: Vec<AllocationRow> = rows
        .iter()
        .filter(|r| &r.region == region)
        .cloned()
        .collect();
    let outstanding = outstanding_by_grant(&here);
    let mut groups: Vec<tollgate_region::OutsideCredits> = Vec::new();
    for grant in grants.iter().filter(|g| g.state == GrantState::Open) {
        let held = outstanding.get(grant.id.as_str()).copied().unwrap_or(0);
        let amount = grant.remaining.micros() - held;
        if amount <= 0 {
            continue;
        }
        let terms = |o: &tollgate_region::OutsideCredits| {
            o.effective_at == grant.effective_at
                && o.expires_at == grant.expires_at
                && o.scope == grant.scope
        };
        if let Some(group) = groups.iter_mut().find(|o| terms(o)) {
            group.amount = Credits::from_micros(group.amount.micros().saturating_add(amount));
        } else if groups.len() < SUMMARY_OUTSIDE_GROUPS_MAX {
            groups.push(tollgate_region::OutsideCredits {
                amount: Credits::from_micros(amount),
                effective_at: grant.effective_at,
                expires_at: grant.expires_at,
                scope: grant.scope.clone(),
            });
        } else {
            warn!(%region, account = %snapshot.account, grant = %grant.id,
                "too many kinds of grants to summarize; the balance edges tell leaves some out");
        }
    }
    let room_outstanding = outstanding.get("").copied().unwrap_or(0);
    let debt_basis = Credits::from_micros(snapshot.debt.micros().saturating_add(room_outstanding));
    (groups, debt_basis)
}

fn slices_total(slices: &[SegmentSpec]) -> i64 {
    slices.iter().map(|s| s.amount.micros()).sum()
}

/// Whether a grant's credits can be handed out at `now`: open, effective, not expired. A grant
/// not yet effective is left with the authority until it is (a region holding it could not
/// spend it, and its slice would take the place of credits it can spend).
fn allocatable(grant: &Grant, now: Timestamp) -> bool {
    grant.state == GrantState::Open
        && grant.effective_at <= now
        && grant.expires_at.is_none_or(|e| now < e)
}

/// What is outstanding in regions, per grant.
fn outstanding_by_grant(rows: &[AllocationRow]) -> BTreeMap<&str, i64> {
    let mut outstanding: BTreeMap<&str, i64> = BTreeMap::new();
    for row in rows {
        *outstanding.entry(row.grant_id.as_str()).or_default() += row.outstanding().max(0);
    }
    outstanding
}

/// Free micro-credits of the grants that can be handed out now (covering `feature`, when
/// given): what the ledger says remains less what regions hold.
pub fn free_micros(
    grants: &[Grant],
    rows: &[AllocationRow],
    feature: Option<&FeatureKey>,
    now: Timestamp,
) -> i64 {
    let outstanding = outstanding_by_grant(rows);
    grants
        .iter()
        .filter(|g| allocatable(g, now) && feature.is_none_or(|f| g.scope.covers(f)))
        .map(|g| {
            let held = outstanding.get(g.id.as_str()).copied().unwrap_or(0);
            (g.remaining.micros() - held).max(0)
        })
        .fold(0_i64, i64::saturating_add)
}

/// Slices for `need` micro-credits from the grants' free credits, in burn-down order, grants
/// covering `feature` first. Free = what the ledger says remains less what regions hold.
pub fn cut_slices(
    grants: &[Grant],
    rows: &[AllocationRow],
    feature: Option<&FeatureKey>,
    need: i64,
    now: Timestamp,
) -> Vec<SegmentSpec> {
    let outstanding = outstanding_by_grant(rows);
    let mut eligible: Vec<&Grant> = grants.iter().filter(|g| allocatable(g, now)).collect();
    eligible.sort_by(|a, b| {
        let covers = |g: &Grant| feature.is_some_and(|f| !g.scope.covers(f));
        covers(a).cmp(&covers(b)).then_with(|| burn_order(a, b))
    });
    let mut left = need;
    let mut slices = Vec::new();
    for grant in eligible {
        if left <= 0 || slices.len() >= ALLOCATION_SEGMENTS_MAX {
            break;
        }
        let held = outstanding.get(grant.id.as_str()).copied().unwrap_or(0);
        let free = grant.remaining.micros() - held;
        let take = free.min(left).min(tollgate_region::REGION_MICROS_MAX);
        if take <= 0 {
            continue;
        }
        left -= take;
        slices.push(SegmentSpec {
            grant_id: grant.id.clone(),
            amount: Credits::from_micros(take),
            priority: grant.priority,
            effective_at: grant.effective_at,
            expires_at: grant.expires_at,
            scope: grant.scope.clone(),
        });
    }
    slices
}

/// What [`cut_slices`] cuts from all of an account's grants, decided from `first`, the first of
/// them in burn-down order, or `None` when the rest must be read. `cut_slices` takes the
/// grants covering `feature` (every grant, without a feature) before the others, each group in
/// burn-down order; when the covering grants of `first` already meet the need or the slice
/// limit, it stops before any grant after them.
pub fn slices_from_first(
    first: &[Grant],
    rows: &[AllocationRow],
    feature: Option<&FeatureKey>,
    need: i64,
    now: Timestamp,
) -> Option<Vec<SegmentSpec>> {
    let covering: Vec<Grant> = first
        .iter()
        .filter(|g| feature.is_none_or(|f| g.scope.covers(f)))
        .cloned()
        .collect();
    let slices = cut_slices(&covering, rows, feature, need, now);
    let cut: i64 = slices.iter().map(|s| s.amount.micros()).sum();
    (cut >= need || slices.len() >= ALLOCATION_SEGMENTS_MAX).then_some(slices)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tollgate_core::{GrantId, GrantSource, Scope};

    fn at(ms: i64) -> Timestamp {
        Timestamp::from_millis(ms).unwrap()
    }

    fn grant(id: &str, amount: i64, source: GrantSource) -> Grant {
        Grant::new(
            GrantId::new(id).unwrap(),
            Credits::from_micros(amount),
            source,
            at(0),
        )
    }

    #[test]
    fn slices_follow_burn_order_and_never_exceed_what_is_free() {
        let grants = vec![
            grant("purchase", 1_000, GrantSource::Purchase),
            grant("sub", 500, GrantSource::Subscription),
        ];
        let rows = vec![AllocationRow {
            region: RegionId::new("eu").unwrap(),
            grant_id: "sub".into(),
            installed: 450,
            taken_back: 0,
            spent: 50,
        }];
        let slices = cut_slices(&grants, &rows, None, 800, at(1));
        let cut: Vec<(String, i64)> = slices
            .iter()
            .map(|s| (s.grant_id.to_string(), s.amount.micros()))
            .collect();
        // The subscription burns first; 400 of it is still out in a region.
        assert_eq!(cut, [("sub".to_owned(), 100), ("purchase".to_owned(), 700)]);
        let everything = cut_slices(&grants, &rows, None, 10_000, at(1));
        let total: i64 = everything.iter().map(|s| s.amount.micros()).sum();
        assert_eq!(total, 1_500 - 400);
    }

    #[test]
    fn grants_covering_the_feature_come_first_and_expired_ones_never() {
        let feature = FeatureKey::new("sms").unwrap();
        let scoped = grant("scoped", 100, GrantSource::Purchase)
            .with_scope(Scope::Features([feature.clone()].into()));
        let expired = grant("old", 100, GrantSource::Subscription).with_expiry(at(5));
        let other = grant("other", 100, GrantSource::Subscription)
            .with_scope(Scope::Features([FeatureKey::new("mail").unwrap()].into()));
        let slices = cut_slices(&[other, scoped, expired], &[], Some(&feature), 150, at(10));
        let ids: Vec<&str> = slices.iter().map(|s| s.grant_id.as_str()).collect();
        assert_eq!(ids, ["scoped", "other"]);
    }

    /// Whenever the first grants in burn-down order decide an allocation, it is the one all of
    /// the grants give: over many generated accounts, features, needs and region counters.
    #[test]
    fn the_first_grants_decide_only_what_all_of_them_would() {
        let features = [
            FeatureKey::new("sms").unwrap(),
            FeatureKey::new("mail").unwrap(),
        ];
        let mut state = 7_u64;
        let mut next = |below: u64| {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (state >> 33) % below
        };
        let (mut decided, mut undecided) = (0, 0);
        for case in 0..300 {
            let count = 1 + next(200) as usize;
            let mut grants: Vec<Grant> = (0..count)
                .map(|n| {
                    let mut g = grant(
                        &format!("g{case}-{n}"),
                        1 + next(50) as i64,
                        GrantSource::Purchase,
                    )
                    .with_priority(next(4) as u32 * 10);
                    if next(2) == 0 {
                        g = g.with_expiry(at(1 + next(40) as i64));
                    }
                    if next(4) == 0 {
                        let f = features[next(2) as usize].clone();
                        g = g.with_scope(Scope::Features([f].into()));
                    }
                    g
                })
                .collect();
            grants.sort_by(burn_order);
            let mut rows = Vec::new();
            for g in &grants {
                if next(3) == 0 {
                    rows.push(AllocationRow {
                        region: RegionId::new("eu").unwrap(),
                        grant_id: g.id.to_string(),
                        installed: next(60) as i64,
                        taken_back: 0,
                        spent: 0,
                    });
                }
            }
            let feature = match next(3) {
                0 => None,
                n => Some(&features[n as usize - 1]),
            };
            let need = 1 + next(3_000) as i64;
            let now = at(next(30) as i64);
            let all = cut_slices(&grants, &rows, feature, need, now);
            for first in [1, count / 4, count / 2, count] {
                match slices_from_first(&grants[..first], &rows, feature, need, now) {
                    Some(slices) => {
                        assert_eq!(slices, all, "case {case}, first {first}");
                        decided += 1;
                    }
                    None => undecided += 1,
                }
            }
        }
        assert!(
            decided > 100 && undecided > 100,
            "{decided} decided, {undecided} not"
        );
    }
}
