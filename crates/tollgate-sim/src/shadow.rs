//! The reference model's view of each account, kept beside the real system: what the account's
//! own ledger would hold if every acknowledged spend, hold, reversal and refund had been
//! applied to it at its event time with the burn-down rules, whatever region or edge decided
//! it and whether or not it is reconciled yet.
//!
//! [`ShadowBook`] applies the rules of `tollgate_core::AccountBook` with the same planner
//! (`plan_burn`), the same capture split (`BurnPlan::split_at`) and the same refund order, but
//! keeps only what the simulator asks about: it drops holds once they end, and it never
//! clones itself per operation (the reference book does, for all-or-nothing operations,
//! which a history of a million steps cannot afford). Grants are never closed: a grant past
//! its expiry simply stops being eligible, which is what the ledger's expiry entry records
//! later. The test at the end drives both books with the same random operations and asserts
//! that they agree.
//!
//! **Which grants a spend consumed.** An acknowledged debit is applied with the draws the
//! edge reported (`Debited::draws` and `overdraft`): those are exactly what the ledger applies
//! when the debit is reconciled, so the model's grants stay what the account's ledger will
//! hold, even where a region or a lease drew off the burn-down order (a lease holds slices
//! taken before a newer grant arrived). Planning the draws again by the rules instead would
//! let the model drift from the ledger through scopes and expiries, and then call refusals
//! false that the ledger itself would make. The rules still judge: a spend is checked against
//! the planner before it is applied (beyond the account's credits?) and its draws against the
//! planner's (off the burn-down order?), and both are counted. A hold reserves what its region
//! set aside (the edge reports the hold's draws, judged the same way), and its capture takes
//! from those in their order, as the region's does; refunds go back to the recorded draws, as
//! in the ledger. A refund grant the ledger creates is named after its debit
//! (`<debit>.refund.<n>`); the model names its own `<debit>.model-refund.<n>` and takes a
//! ledger name found in a region's draws as the next of its refund grants for that debit.
//!
//! [`ShadowAccount`] adds history: a cached decision acknowledged by an edge that then crashed
//! before flushing never reaches the ledger, so from then on the account's ledger is the
//! history without it. The account keeps the events since the oldest spend that may still be
//! lost and replays them without the lost one; older events are folded into a base book.

use std::collections::{BTreeMap, VecDeque};

use tollgate_core::{
    plan_burn, BurnPlan, BurnRequest, Credits, DebitId, DebitRecord, Draw, FeatureKey, Grant,
    GrantId, GrantSource, HoldId, Reserved, Shortfall, Timestamp,
};

/// An acknowledged spend as the simulator names it: region and idempotency key.
pub type AckRef = (usize, String);

/// The log is folded only past this length, so folding costs nothing on most steps.
const FOLD_LOG_MIN: usize = 128;

/// A pending hold: what it reserves, from when, until when.
#[derive(Clone, Debug)]
struct ShadowHold {
    reserved: BurnPlan,
    amount: Credits,
    created_at: Timestamp,
    expires_at: Timestamp,
}

/// One account's grants, debt, pending holds and debits, under the rules of `AccountBook`.
#[derive(Clone, Debug)]
pub struct ShadowBook {
    overdraft_limit: Credits,
    debt: Credits,
    grants: BTreeMap<GrantId, Grant>,
    holds: BTreeMap<HoldId, ShadowHold>,
    debits: BTreeMap<DebitId, DebitRecord>,
    /// The refund grants the model made for each debit, in the order it made them.
    refund_grants: BTreeMap<DebitId, Vec<GrantId>>,
    /// The ledger's name for a refund grant → the model's.
    aliases: BTreeMap<GrantId, GrantId>,
}

/// How the model took a spend (or a capture, release, refund: then `in_order` says nothing).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Applied {
    /// Within the rules: the account could pay (or the hold or debit could be captured,
    /// released, refunded as the edges did).
    pub allowed: bool,
    /// The draws were the burn-down rules' draws.
    pub in_order: bool,
    /// Applied as the edge reported it (draws naming grants the model knows, each within
    /// what the grant has left).
    pub as_reported: bool,
}

impl Applied {
    fn ruled(allowed: bool) -> Self {
        Applied {
            allowed,
            in_order: true,
            as_reported: allowed,
        }
    }
}

impl ShadowBook {
    pub fn new(overdraft_limit: Credits) -> Self {
        ShadowBook {
            overdraft_limit,
            debt: Credits::ZERO,
            grants: BTreeMap::new(),
            holds: BTreeMap::new(),
            debits: BTreeMap::new(),
            refund_grants: BTreeMap::new(),
            aliases: BTreeMap::new(),
        }
    }

    pub fn debt(&self) -> Credits {
        self.debt
    }

    pub fn grant(&self, id: &GrantId) -> Option<&Grant> {
        self.grants.get(id)
    }

    pub fn grants(&self) -> impl Iterator<Item = &Grant> {
        self.grants.values()
    }

    /// What pending holds set aside at `at` (a hold past its TTL sets nothing aside).
    fn reserved_at(&self, at: Timestamp) -> Reserved {
        let mut reserved = Reserved::default();
        for hold in self.holds.values().filter(|h| at < h.expires_at) {
            // Bounded by the grants' amounts, which fit.
            let _ = reserved.add(&hold.reserved);
        }
        reserved
    }

    /// The account's answer to "may it spend `cost` on `feature` at `at`": the draws in
    /// burn-down order, or the shortfall with what was available (eligible grants covering
    /// the feature less holds, plus overdraft room).
    pub fn plan(
        &self,
        feature: &FeatureKey,
        at: Timestamp,
        cost: Credits,
    ) -> Result<BurnPlan, Shortfall> {
        self.plan_within(feature, at, cost, self.overdraft_limit)
    }

    fn plan_within(
        &self,
        feature: &FeatureKey,
        at: Timestamp,
        cost: Credits,
        overdraft_limit: Credits,
    ) -> Result<BurnPlan, Shortfall> {
        let request = BurnRequest {
            feature,
            at,
            cost,
            overdraft_limit,
            debt: self.debt,
        };
        plan_burn(self.grants.values(), &self.reserved_at(at), &request)
    }

    /// What pays for a spend the edges allowed and the rules would not: the grants as far as
    /// they go, the rest as debt beyond the limit. Recorded, so the model still holds every
    /// acknowledged spend; the caller counts it.
    fn forced_plan(&self, feature: &FeatureKey, at: Timestamp, cost: Credits) -> BurnPlan {
        self.plan_within(feature, at, cost, Credits::MAX)
            .unwrap_or_else(|_| BurnPlan {
                draws: Vec::new(),
                overdraft: cost,
            })
    }

    /// What the account could spend on `feature` at `at`: eligible grants covering it less
    /// what holds set aside on them, plus overdraft room (the planner's `available`).
    pub fn available(&self, feature: &FeatureKey, at: Timestamp) -> Credits {
        let credits: i64 = self
            .eligible(feature, at)
            .iter()
            .map(|(_, left)| left.micros())
            .sum();
        let room = self
            .overdraft_limit
            .saturating_sub_floor_zero(self.debt)
            .saturating_sub_floor_zero(self.reserved_at(at).overdraft());
        Credits::from_micros(credits + room.micros())
    }

    /// The account's balance at `at`: effective, unexpired grants less pending holds and debt.
    pub fn balance(&self, at: Timestamp) -> Credits {
        let reserved = self.reserved_at(at);
        let credits: i64 = self
            .grants
            .values()
            .filter(|g| g.is_active_at(at))
            .map(|g| g.remaining.micros() - reserved.on_grant(&g.id).micros())
            .sum();
        Credits::from_micros(credits - reserved.overdraft().micros() - self.debt.micros())
    }

    /// The eligible grants for `feature` at `at`, in burn-down order, with what each has left
    /// once holds are taken off (for a failure message).
    pub fn eligible(&self, feature: &FeatureKey, at: Timestamp) -> Vec<(GrantId, Credits)> {
        let reserved = self.reserved_at(at);
        let mut grants: Vec<&Grant> = self
            .grants
            .values()
            .filter(|g| g.is_eligible(feature, at))
            .collect();
        grants.sort_by(|a, b| tollgate_core::burn_order(a, b));
        grants
            .into_iter()
            .map(|g| {
                let left = g
                    .remaining
                    .saturating_sub_floor_zero(reserved.on_grant(&g.id));
                (g.id.clone(), left)
            })
            .collect()
    }

    /// As `AccountBook` does before every operation that takes a time.
    fn expire_holds(&mut self, at: Timestamp) {
        self.holds.retain(|_, hold| at < hold.expires_at);
    }

    /// A new grant; it settles debt first when in effect (as `AccountBook::add_grant`).
    pub fn add_grant(&mut self, grant: Grant, at: Timestamp) {
        self.expire_holds(at);
        self.insert_grant(grant, at);
    }

    fn insert_grant(&mut self, grant: Grant, at: Timestamp) {
        let id = grant.id.clone();
        let previous = self.grants.insert(id.clone(), grant);
        assert!(previous.is_none(), "grant {id} issued twice to the model");
        self.settle(&id, at);
    }

    fn settle(&mut self, id: &GrantId, at: Timestamp) {
        let Some(grant) = self.grants.get_mut(id) else {
            return;
        };
        if !self.debt.is_positive() || !grant.is_active_at(at) {
            return;
        }
        let amount = self.debt.min(grant.remaining);
        grant.remaining = Credits::from_micros(grant.remaining.micros() - amount.micros());
        self.debt = Credits::from_micros(self.debt.micros() - amount.micros());
    }

    /// A debit at `at`. Returns whether the rules allowed it; when they did not, it is
    /// recorded anyway (see [`ShadowBook::forced_plan`]).
    pub fn debit(
        &mut self,
        id: DebitId,
        feature: &FeatureKey,
        at: Timestamp,
        cost: Credits,
    ) -> bool {
        self.expire_holds(at);
        let (plan, allowed) = match self.plan(feature, at, cost) {
            Ok(plan) => (plan, true),
            Err(_) => (self.forced_plan(feature, at, cost), false),
        };
        self.apply_debit(id, at, plan);
        allowed
    }

    /// A debit at `at` with the draws an edge reported. Judged against the rules first; when
    /// the draws cannot be applied (a grant the model does not know, or short), the rules'
    /// plan is applied instead and `as_reported` is false.
    pub fn debit_drawn(
        &mut self,
        id: DebitId,
        feature: &FeatureKey,
        at: Timestamp,
        cost: Credits,
        drawn: &BurnPlan,
    ) -> Applied {
        self.expire_holds(at);
        let (applied, plan) = self.judge_drawn(feature, at, cost, drawn);
        self.apply_debit(id, at, plan);
        applied
    }

    /// What a region drew for a spend of `cost`, judged against the rules (beyond them? off
    /// the burn-down order?), and the plan the model applies: the reported draws in the
    /// model's names when it can (they sum to the cost and fit what the grants have left),
    /// else the rules' plan, else the forced one.
    fn judge_drawn(
        &mut self,
        feature: &FeatureKey,
        at: Timestamp,
        cost: Credits,
        drawn: &BurnPlan,
    ) -> (Applied, BurnPlan) {
        let ruled = self.plan(feature, at, cost);
        let reported = self
            .resolve(drawn)
            .filter(|plan| plan.total().ok() == Some(cost));
        let applied = Applied {
            allowed: ruled.is_ok(),
            in_order: reported.as_ref() == ruled.as_ref().ok(),
            as_reported: reported.is_some(),
        };
        let plan = match (reported, ruled) {
            (Some(plan), _) | (None, Ok(plan)) => plan,
            (None, Err(_)) => self.forced_plan(feature, at, cost),
        };
        (applied, plan)
    }

    /// The reported draws in the model's grant names, when every one names a grant the model
    /// knows and is within what it has left.
    fn resolve(&mut self, drawn: &BurnPlan) -> Option<BurnPlan> {
        let mut plan = BurnPlan {
            draws: Vec::with_capacity(drawn.draws.len()),
            overdraft: drawn.overdraft,
        };
        for draw in &drawn.draws {
            let grant_id = self.model_grant_id(&draw.grant_id)?;
            let grant = self.grants.get(&grant_id)?;
            if draw.amount > grant.remaining {
                return None;
            }
            plan.draws.push(Draw {
                grant_id,
                amount: draw.amount,
            });
        }
        Some(plan)
    }

    /// The model's name for a grant a region drew from: the same, or for a refund grant the
    /// ledger named `<debit>.refund.<n>`, the model's next refund grant for that debit.
    fn model_grant_id(&mut self, id: &GrantId) -> Option<GrantId> {
        if self.grants.contains_key(id) {
            return Some(id.clone());
        }
        if let Some(known) = self.aliases.get(id) {
            return Some(known.clone());
        }
        let (debit, _) = id.as_str().rsplit_once(".refund.")?;
        let debit = DebitId::new(debit).ok()?;
        let next = self
            .refund_grants
            .get(&debit)?
            .iter()
            .find(|candidate| !self.aliases.values().any(|taken| taken == *candidate))?
            .clone();
        self.aliases.insert(id.clone(), next.clone());
        Some(next)
    }

    fn apply_debit(&mut self, id: DebitId, at: Timestamp, plan: BurnPlan) {
        for draw in &plan.draws {
            if let Some(grant) = self.grants.get_mut(&draw.grant_id) {
                // The planner draws at most what a grant has left.
                grant.remaining = grant.remaining.saturating_sub_floor_zero(draw.amount);
            }
        }
        self.debt = Credits::from_micros(self.debt.micros() + plan.overdraft.micros());
        let record = DebitRecord {
            at,
            refunded_draws: vec![Credits::ZERO; plan.draws.len()],
            refunded_overdraft: Credits::ZERO,
            plan,
        };
        let previous = self.debits.insert(id.clone(), record);
        assert!(previous.is_none(), "debit {id} applied twice to the model");
    }

    /// A hold of `cost` until `expires_at` that set aside `drawn` in its region. Like a debit,
    /// the hold reserves what the region reported (what its capture will draw), judged against
    /// the rules: beyond them, or off the burn-down order. A region drawing off the order is
    /// one whose earlier grant was out of its reach (on an edge's lease, or under another
    /// hold); planning the hold again by the rules would let the model's grants drift from
    /// the ledger's.
    pub fn authorize(
        &mut self,
        id: HoldId,
        feature: &FeatureKey,
        at: Timestamp,
        cost: Credits,
        expires_at: Timestamp,
        drawn: &BurnPlan,
    ) -> Applied {
        self.expire_holds(at);
        let (applied, reserved) = self.judge_drawn(feature, at, cost, drawn);
        let hold = ShadowHold {
            reserved,
            amount: cost,
            created_at: at,
            expires_at,
        };
        self.holds.insert(id, hold);
        applied
    }

    /// Captures `amount` of a pending hold as debit `id`, as of the hold's creation (the
    /// credits were set aside then); the rest goes back. Returns whether the hold could be
    /// captured so; when not (unknown to the model, past its TTL, or short), the amount is
    /// debited now instead, and the hold, if any, ends.
    pub fn capture(
        &mut self,
        hold: &HoldId,
        amount: Credits,
        id: DebitId,
        feature: &FeatureKey,
        at: Timestamp,
    ) -> bool {
        match self.holds.remove(hold) {
            Some(held) if at < held.expires_at && amount <= held.amount => {
                let (captured, _released) = held.reserved.split_at(amount);
                self.apply_debit(id, held.created_at, captured);
                true
            }
            _ => {
                let plan = self.forced_plan(feature, at, amount);
                self.apply_debit(id, at, plan);
                false
            }
        }
    }

    /// Ends a pending hold. Returns whether it was pending at `at`.
    pub fn release(&mut self, hold: &HoldId, at: Timestamp) -> bool {
        self.holds
            .remove(hold)
            .is_some_and(|held| at < held.expires_at)
    }

    /// Refunds `amount` of debit `id` as `AccountBook::refund` does: the overdraft part pays
    /// the debt back first, then draws from last to first go back to their grants when still
    /// active at `at`; the rest becomes a new refund grant (`grant_id`, no expiry) with the
    /// priority and scope of the first grant it came from. Returns false, changing nothing,
    /// when the debit is unknown or the amount exceeds what is left to refund.
    pub fn refund(
        &mut self,
        id: &DebitId,
        amount: Credits,
        at: Timestamp,
        grant_id: GrantId,
    ) -> bool {
        let Some(mut record) = self.debits.get(id).cloned() else {
            return false;
        };
        let refundable = record.amount().saturating_sub_floor_zero(record.refunded());
        if amount.is_negative() || amount > refundable {
            return false;
        }
        self.expire_holds(at);
        let mut left = amount.micros();
        let mut pool = self.refund_overdraft(&mut record, &mut left);
        let mut template: Option<Grant> = None;
        for index in (0..record.plan.draws.len()).rev() {
            if left == 0 {
                break;
            }
            let draw = &record.plan.draws[index];
            let portion = left.min(draw.amount.micros() - record.refunded_draws[index].micros());
            if portion <= 0 {
                continue;
            }
            left -= portion;
            record.refunded_draws[index] =
                Credits::from_micros(record.refunded_draws[index].micros() + portion);
            match self.grants.get_mut(&draw.grant_id) {
                Some(grant) if grant.is_active_at(at) => {
                    grant.remaining = Credits::from_micros(grant.remaining.micros() + portion);
                }
                grant => {
                    if template.is_none() {
                        template = grant.cloned();
                    }
                    pool += portion;
                }
            }
        }
        self.debits.insert(id.clone(), record);
        if pool > 0 {
            let mut grant = Grant::new(
                grant_id.clone(),
                Credits::from_micros(pool),
                GrantSource::Refund,
                at,
            );
            if let Some(template) = template {
                grant = grant
                    .with_priority(template.priority)
                    .with_scope(template.scope);
            }
            self.insert_grant(grant, at);
            self.refund_grants
                .entry(id.clone())
                .or_default()
                .push(grant_id);
        }
        true
    }

    /// The overdraft part of a refund: pays the debt back; what the debt no longer needs is
    /// returned for the refund grant. Takes it off `left`.
    fn refund_overdraft(&mut self, record: &mut DebitRecord, left: &mut i64) -> i64 {
        let unrefunded = record.plan.overdraft.micros() - record.refunded_overdraft.micros();
        let from_overdraft = (*left).min(unrefunded);
        if from_overdraft <= 0 {
            return 0;
        }
        let to_debt = from_overdraft.min(self.debt.micros());
        self.debt = Credits::from_micros(self.debt.micros() - to_debt);
        record.refunded_overdraft =
            Credits::from_micros(record.refunded_overdraft.micros() + from_overdraft);
        *left -= from_overdraft;
        from_overdraft - to_debt
    }
}

/// One change to an account, as the model applies it.
#[derive(Clone, Debug)]
enum Event {
    Grant {
        grant: Grant,
        at: Timestamp,
    },
    Debit {
        id: DebitId,
        ack: AckRef,
        feature: FeatureKey,
        cost: Credits,
        /// What the edge drew.
        drawn: BurnPlan,
        at: Timestamp,
        /// Lost with a crashed edge: never reaches the ledger, so not applied.
        lost: bool,
    },
    Authorize {
        hold: HoldId,
        feature: FeatureKey,
        cost: Credits,
        /// What the region set aside.
        drawn: BurnPlan,
        at: Timestamp,
        expires_at: Timestamp,
    },
    Capture {
        hold: HoldId,
        amount: Credits,
        id: DebitId,
        feature: FeatureKey,
        at: Timestamp,
    },
    Release {
        hold: HoldId,
        at: Timestamp,
    },
    Refund {
        id: DebitId,
        amount: Credits,
        at: Timestamp,
        grant_id: GrantId,
    },
}

impl Event {
    /// Applies the event; says how the model took it.
    fn apply(&self, book: &mut ShadowBook) -> Applied {
        match self {
            Event::Grant { grant, at } => {
                book.add_grant(grant.clone(), *at);
                Applied::ruled(true)
            }
            Event::Debit { lost: true, .. } => Applied::ruled(true),
            Event::Debit {
                id,
                feature,
                cost,
                drawn,
                at,
                ..
            } => book.debit_drawn(id.clone(), feature, *at, *cost, drawn),
            Event::Authorize {
                hold,
                feature,
                cost,
                drawn,
                at,
                expires_at,
            } => book.authorize(hold.clone(), feature, *at, *cost, *expires_at, drawn),
            Event::Capture {
                hold,
                amount,
                id,
                feature,
                at,
            } => Applied::ruled(book.capture(hold, *amount, id.clone(), feature, *at)),
            Event::Release { hold, at } => Applied::ruled(book.release(hold, *at)),
            Event::Refund {
                id,
                amount,
                at,
                grant_id,
            } => Applied::ruled(book.refund(id, *amount, *at, grant_id.clone())),
        }
    }

    /// A spend that may still be lost: a debit not yet known to have reached the region.
    fn may_be_lost(&self, unsettled: &impl Fn(&AckRef) -> bool) -> bool {
        matches!(self, Event::Debit { ack, lost: false, .. } if unsettled(ack))
    }
}

/// One account in the model: the book as of now (`live`), and enough history to take a lost
/// spend out of it exactly.
pub struct ShadowAccount {
    /// Every event before the oldest one still in `log`.
    base: ShadowBook,
    log: VecDeque<Event>,
    /// `base` with every event of `log` applied.
    live: ShadowBook,
    /// The debit (the ledger's id) of each acknowledged spend that stands.
    charges: BTreeMap<AckRef, DebitId>,
    /// Numbers the model's refund grants.
    next_id: u64,
}

impl ShadowAccount {
    pub fn new(overdraft_limit: Credits) -> Self {
        ShadowAccount {
            base: ShadowBook::new(overdraft_limit),
            log: VecDeque::new(),
            live: ShadowBook::new(overdraft_limit),
            charges: BTreeMap::new(),
            next_id: 0,
        }
    }

    /// The account as of now.
    pub fn book(&self) -> &ShadowBook {
        &self.live
    }

    fn record(&mut self, event: Event) -> Applied {
        let applied = event.apply(&mut self.live);
        self.log.push_back(event);
        applied
    }

    fn next_refund_grant_id(&mut self, debit: &DebitId) -> GrantId {
        self.next_id += 1;
        GrantId::new(format!("{debit}.model-refund.{}", self.next_id))
            .unwrap_or_else(|e| panic!("model refund grant id: {e}"))
    }

    pub fn grant(&mut self, grant: Grant, at: Timestamp) {
        self.record(Event::Grant { grant, at });
    }

    /// An acknowledged debit `id` (the ledger's id for it), or a lost one made again by a
    /// retry, with what the edge drew.
    pub fn debit(
        &mut self,
        (ack, id): (AckRef, DebitId),
        feature: FeatureKey,
        cost: Credits,
        drawn: BurnPlan,
        at: Timestamp,
    ) -> Applied {
        self.charges.insert(ack.clone(), id.clone());
        self.record(Event::Debit {
            id,
            ack,
            feature,
            cost,
            drawn,
            at,
            lost: false,
        })
    }

    /// A hold the region placed, setting `drawn` aside.
    pub fn authorize(
        &mut self,
        hold: HoldId,
        feature: FeatureKey,
        (cost, drawn): (Credits, BurnPlan),
        at: Timestamp,
        expires_at: Timestamp,
    ) -> Applied {
        let event = Event::Authorize {
            hold,
            feature,
            cost,
            drawn,
            at,
            expires_at,
        };
        self.record(event)
    }

    /// A capture of `amount` as debit `id` (zero ends the hold and charges nothing),
    /// acknowledged as `ack`.
    pub fn capture(
        &mut self,
        hold: HoldId,
        amount: Credits,
        (ack, id): (AckRef, DebitId),
        feature: FeatureKey,
        at: Timestamp,
    ) -> bool {
        self.charges.insert(ack, id.clone());
        let event = Event::Capture {
            hold,
            amount,
            id,
            feature,
            at,
        };
        self.record(event).allowed
    }

    pub fn release(&mut self, hold: HoldId, at: Timestamp) -> bool {
        self.record(Event::Release { hold, at }).allowed
    }

    /// A reversal (the whole cost) or an operator's refund of an acknowledged spend. Returns
    /// whether the model could refund it so.
    pub fn refund(&mut self, ack: &AckRef, amount: Credits, at: Timestamp) -> bool {
        let Some(id) = self.charges.get(ack).cloned() else {
            return false;
        };
        let grant_id = self.next_refund_grant_id(&id);
        let event = Event::Refund {
            id,
            amount,
            at,
            grant_id,
        };
        self.record(event).allowed
    }

    /// A spend lost with a crashed edge never reaches the ledger: the account is its history
    /// without it. Returns false when the spend is not one that may still be lost.
    pub fn lose(&mut self, ack: &AckRef) -> bool {
        let found = self.log.iter_mut().rev().find_map(|event| match event {
            Event::Debit {
                ack: seen, lost, ..
            } if seen == ack && !*lost => Some(lost),
            _ => None,
        });
        let Some(lost) = found else {
            return false;
        };
        *lost = true;
        self.charges.remove(ack);
        self.live = self.base.clone();
        for event in &self.log {
            event.apply(&mut self.live);
        }
        true
    }

    /// Folds the oldest events into the base book, up to the first spend that may still be
    /// lost (`unsettled` says which acknowledged spends have not reached a region yet).
    pub fn fold(&mut self, unsettled: impl Fn(&AckRef) -> bool) {
        if self.log.len() < FOLD_LOG_MIN {
            return;
        }
        while let Some(event) = self.log.front() {
            if event.may_be_lost(&unsettled) {
                break;
            }
            event.apply(&mut self.base);
            self.log.pop_front();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;
    use tollgate_core::{AccountBook, RefundGrantTerms, Scope};

    fn at(ms: i64) -> Timestamp {
        Timestamp::from_millis(ms).unwrap_or(Timestamp::MAX)
    }

    fn feature(name: &str) -> FeatureKey {
        FeatureKey::new(name).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Both books: the reference and the shadow, driven alike.
    struct Pair {
        reference: AccountBook,
        shadow: ShadowBook,
        debits: Vec<(DebitId, Credits)>,
        holds: Vec<HoldId>,
        counter: u64,
    }

    impl Pair {
        fn id(&mut self, prefix: &str) -> String {
            self.counter += 1;
            format!("{prefix}{}", self.counter)
        }

        fn grant(&mut self, rng: &mut Rng, now: i64) {
            let id = GrantId::new(self.id("g")).unwrap_or_else(|e| panic!("{e}"));
            let source = if rng.chance(50) {
                GrantSource::Purchase
            } else {
                GrantSource::Promo
            };
            let mut grant = Grant::new(
                id,
                Credits::from_micros(rng.range(1, 50) * 100_000),
                source,
                at(now),
            );
            if rng.chance(50) {
                grant = grant.with_expiry(at(now + rng.range(1, 5_000)));
            }
            if rng.chance(30) {
                grant = grant.with_scope(Scope::Features([feature("gen")].into()));
            }
            let reference = self.reference.add_grant(grant.clone(), at(now));
            assert!(reference.is_ok(), "{reference:?}");
            self.shadow.add_grant(grant, at(now));
        }

        fn debit(&mut self, rng: &mut Rng, now: i64) {
            let id = DebitId::new(self.id("d")).unwrap_or_else(|e| panic!("{e}"));
            let name = if rng.chance(50) { "gen" } else { "lookup" };
            let cost = Credits::from_micros(rng.range(1, 40) * 100_000);
            let planned = self.shadow.plan(&feature(name), at(now), cost);
            let reference = self
                .reference
                .debit(id.clone(), &feature(name), at(now), cost)
                .unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(
                planned.is_ok(),
                reference.is_ok(),
                "debit {cost} of {name} at {now}"
            );
            if let Err(shortfall) = &reference {
                assert_eq!(planned.err(), Some(*shortfall));
                return;
            }
            // Half as the rules plan it, half with the draws the reference made.
            if rng.chance(50) {
                assert!(self.shadow.debit(id.clone(), &feature(name), at(now), cost));
            } else {
                let drawn = self.reference.debit_record(&id).map(|r| r.plan.clone());
                let drawn = drawn.unwrap_or_default();
                let applied =
                    self.shadow
                        .debit_drawn(id.clone(), &feature(name), at(now), cost, &drawn);
                let expected = Applied {
                    allowed: true,
                    in_order: true,
                    as_reported: true,
                };
                assert_eq!(applied, expected);
            }
            self.debits.push((id, cost));
        }

        fn authorize(&mut self, rng: &mut Rng, now: i64) {
            let id = HoldId::new(self.id("h")).unwrap_or_else(|e| panic!("{e}"));
            let cost = Credits::from_micros(rng.range(1, 30) * 100_000);
            let expires = at(now + rng.range(1, 3_000));
            let reference = self
                .reference
                .authorize(id.clone(), &feature("gen"), at(now), cost, expires)
                .unwrap_or_else(|e| panic!("{e}"));
            let planned = self.shadow.plan(&feature("gen"), at(now), cost);
            assert_eq!(planned.is_ok(), reference.is_ok(), "hold {cost} at {now}");
            if let Ok(drawn) = planned {
                let applied = self.shadow.authorize(
                    id.clone(),
                    &feature("gen"),
                    at(now),
                    cost,
                    expires,
                    &drawn,
                );
                assert!(applied.allowed && applied.in_order && applied.as_reported);
                self.holds.push(id);
            }
        }

        fn end_hold(&mut self, rng: &mut Rng, now: i64) {
            let Some(pick) = rng.pick(&self.holds) else {
                return;
            };
            let hold = self.holds.swap_remove(pick);
            let pending = self
                .reference
                .hold(&hold)
                .is_some_and(|h| h.status_at(at(now)) == tollgate_core::HoldStatus::Pending);
            if !pending {
                return;
            }
            if rng.chance(50) {
                let reference = self.reference.release(&hold, at(now));
                assert!(matches!(reference, Ok(Ok(_))), "{reference:?}");
                assert!(self.shadow.release(&hold, at(now)));
                return;
            }
            let held = self
                .reference
                .hold(&hold)
                .map_or(Credits::ZERO, |h| h.amount);
            let amount = Credits::from_micros(rng.range(0, held.micros()));
            let id = DebitId::new(self.id("c")).unwrap_or_else(|e| panic!("{e}"));
            let reference = self.reference.capture(&hold, amount, id.clone(), at(now));
            assert!(matches!(reference, Ok(Ok(_))), "{reference:?}");
            assert!(self
                .shadow
                .capture(&hold, amount, id.clone(), &feature("gen"), at(now)));
            self.debits.push((id, amount));
        }

        fn refund(&mut self, rng: &mut Rng, now: i64) {
            let Some(pick) = rng.pick(&self.debits) else {
                return;
            };
            let (id, cost) = self.debits[pick].clone();
            let refunded = self
                .reference
                .debit_record(&id)
                .map_or(Credits::ZERO, |r| r.refunded());
            let left = cost.micros() - refunded.micros();
            if left <= 0 {
                return;
            }
            let amount = Credits::from_micros(rng.range(1, left));
            let grant_id = GrantId::new(self.id("r")).unwrap_or_else(|e| panic!("{e}"));
            let terms = RefundGrantTerms {
                id: grant_id.clone(),
                expires_at: None,
            };
            let reference = self.reference.refund(&id, amount, at(now), terms);
            assert!(reference.is_ok(), "{reference:?}");
            assert!(self.shadow.refund(&id, amount, at(now), grant_id));
        }

        fn assert_same(&self, now: i64) {
            assert_eq!(self.shadow.debt(), self.reference.debt(), "debt at {now}");
            for grant in self.reference.grants() {
                let shadow = self.shadow.grant(&grant.id).map(|g| g.remaining);
                assert_eq!(shadow, Some(grant.remaining), "grant {} at {now}", grant.id);
            }
        }
    }

    #[test]
    fn the_shadow_book_agrees_with_the_reference_book() {
        for seed in 0..200 {
            let mut rng = Rng::new(seed);
            let limit = Credits::from_micros(rng.range(0, 3) * 1_000_000);
            let mut pair = Pair {
                reference: AccountBook::new(limit),
                shadow: ShadowBook::new(limit),
                debits: Vec::new(),
                holds: Vec::new(),
                counter: 0,
            };
            let mut now = 1_000_000;
            for _ in 0..300 {
                now += rng.range(0, 200);
                match rng.below(10) {
                    0 => pair.grant(&mut rng, now),
                    1..=4 => pair.debit(&mut rng, now),
                    5 | 6 => pair.authorize(&mut rng, now),
                    7 | 8 => pair.end_hold(&mut rng, now),
                    _ => pair.refund(&mut rng, now),
                }
                pair.assert_same(now);
            }
        }
    }

    fn id<T>(made: Result<T, tollgate_core::IdError>) -> T {
        made.unwrap_or_else(|e| panic!("{e}"))
    }

    /// An account with one 10-credit grant `g`.
    fn account_with_ten() -> ShadowAccount {
        let mut account = ShadowAccount::new(Credits::ZERO);
        let ten = Credits::from_micros(10_000_000);
        account.grant(
            Grant::new(id(GrantId::new("g")), ten, GrantSource::Purchase, at(0)),
            at(0),
        );
        account
    }

    /// Debits `micros` of `grant` as acknowledged spend `key` at `ms`.
    fn debit(account: &mut ShadowAccount, key: &str, grant: &str, micros: i64, ms: i64) -> Applied {
        let drawn = BurnPlan {
            draws: vec![Draw {
                grant_id: id(GrantId::new(grant)),
                amount: Credits::from_micros(micros),
            }],
            overdraft: Credits::ZERO,
        };
        let charge = ((0, key.to_owned()), id(DebitId::new(format!("r0.{key}"))));
        let cost = Credits::from_micros(micros);
        account.debit(charge, feature("gen"), cost, drawn, at(ms))
    }

    #[test]
    fn a_lost_spend_is_taken_out_of_the_history() {
        let gen = feature("gen");
        let five = Credits::from_micros(5_000_000);
        let mut account = account_with_ten();
        let applied = debit(&mut account, "d1", "g", 6_000_000, 1);
        assert!(applied.allowed && applied.in_order && applied.as_reported);
        // Only 4 left: the model refuses 5 until the first spend is known lost.
        assert!(account.book().plan(&gen, at(2), five).is_err());
        assert!(account.lose(&(0, "d1".to_owned())));
        assert!(account.book().plan(&gen, at(2), five).is_ok());
        assert!(debit(&mut account, "d2", "g", 5_000_000, 3).allowed);
        assert_eq!(account.book().balance(at(3)), five);
        // Settled spends fold into the base; a lost spend can then no longer be taken out.
        for n in 0..FOLD_LOG_MIN {
            let one = Grant::new(
                id(GrantId::new(format!("f{n}"))),
                Credits::MICRO,
                GrantSource::Promo,
                at(4),
            );
            account.grant(one, at(4));
        }
        account.fold(|_| false);
        assert!(!account.lose(&(0, "d2".to_owned())));
        let left = Credits::from_micros(5_000_000 + FOLD_LOG_MIN as i64);
        assert_eq!(account.book().balance(at(5)), left);
    }

    #[test]
    fn a_refund_grant_the_ledger_named_is_the_models_refund_grant() {
        let mut grant = Grant::new(
            id(GrantId::new("g")),
            Credits::from_micros(10_000_000),
            GrantSource::Purchase,
            at(0),
        );
        grant = grant.with_expiry(at(100));
        let mut account = ShadowAccount::new(Credits::ZERO);
        account.grant(grant, at(0));
        assert!(debit(&mut account, "d1", "g", 4_000_000, 1).allowed);
        // Refunded after the grant ended: the credits land in a new refund grant.
        assert!(account.refund(
            &(0, "d1".to_owned()),
            Credits::from_micros(3_000_000),
            at(200)
        ));
        let applied = debit(&mut account, "d2", "r0.d1.refund.7", 2_000_000, 201);
        assert!(applied.allowed && applied.in_order && applied.as_reported);
        assert_eq!(
            account.book().balance(at(202)),
            Credits::from_micros(1_000_000)
        );
        // A name that is no refund grant of the model's is not applied as reported.
        let unknown = debit(&mut account, "d3", "r0.d9.refund.8", 1_000_000, 203);
        assert!(unknown.allowed && !unknown.as_reported);
    }
}
