//! One account's credits as a pure state machine: grants, debt, holds and debits, and the
//! ledger movements each operation produces.
//!
//! This is the reference model of the rules. Stores that keep the same state in SQL or Redis
//! are checked against it, and it is what the property tests drive with random operations.
//!
//! Holds reserve credits without taking them from `remaining`; the planner subtracts what is
//! reserved. When a grant closes (expires or is voided) while a hold still reserves part of it,
//! that part stays on the grant until the hold ends: a capture takes it as a debit, a release
//! or a hold expiry closes it with an `expire` or `void` movement. So a closed grant's
//! `remaining` always equals what pending holds reserve on it.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::burn::{plan_burn, BurnPlan, BurnRequest, Draw, Reserved, Shortfall};
use crate::credits::Credits;
use crate::error::{AmountError, BookError, GrantError};
use crate::grant::{burn_order, Grant, GrantSource, GrantState};
use crate::hold::{Hold, HoldError, HoldStatus};
use crate::ids::{DebitId, FeatureKey, GrantId, HoldId};
use crate::ledger::{check_invariants, held_balance, EntryKind, InvariantViolation, Totals};
use crate::recurrence::{GrantSchedule, ScheduleError};
use crate::time::Timestamp;

/// One line of a ledger entry: a kind, an amount, and the grant it touched (none for debt).
/// `amount` is a magnitude, except for `Adjust` where it is signed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Movement {
    pub kind: EntryKind,
    pub amount: Credits,
    pub grant_id: Option<GrantId>,
}

/// A debit as recorded, with what has been refunded of it so far.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DebitRecord {
    pub at: Timestamp,
    pub plan: BurnPlan,
    /// Refunded so far of each draw, in the plan's order.
    pub refunded_draws: Vec<Credits>,
    pub refunded_overdraft: Credits,
}

impl DebitRecord {
    pub fn amount(&self) -> Credits {
        self.plan.total().unwrap_or(Credits::MAX)
    }

    pub fn refunded(&self) -> Credits {
        Credits::checked_sum(
            self.refunded_draws
                .iter()
                .copied()
                .chain([self.refunded_overdraft]),
        )
        .unwrap_or(Credits::MAX)
    }
}

/// Where a refund that cannot go back to its grants lands.
#[derive(Clone, Debug)]
pub struct RefundGrantTerms {
    pub id: GrantId,
    pub expires_at: Option<Timestamp>,
}

type Outcome<T> = Result<Result<T, Shortfall>, BookError>;

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccountBook {
    grants: BTreeMap<GrantId, Grant>,
    debt: Credits,
    overdraft_limit: Credits,
    totals: Totals,
    debits: BTreeMap<DebitId, DebitRecord>,
    holds: BTreeMap<HoldId, Hold>,
}

impl AccountBook {
    pub fn new(overdraft_limit: Credits) -> Self {
        debug_assert!(!overdraft_limit.is_negative());
        AccountBook {
            overdraft_limit,
            ..AccountBook::default()
        }
    }

    /// Rebuilds a book from what a store kept: the account's running totals, its debt, and the
    /// grants and debit records one operation needs (a store loads only those, so `balance()`
    /// and `check()` describe the loaded part, not the whole account). Holds are not stored:
    /// they live in the regional stores, so a rebuilt book has none.
    ///
    /// Every grant is validated, and a debit record must refund no more than it paid.
    pub fn from_parts(
        overdraft_limit: Credits,
        debt: Credits,
        totals: Totals,
        grants: impl IntoIterator<Item = Grant>,
        debits: impl IntoIterator<Item = (DebitId, DebitRecord)>,
    ) -> Result<Self, BookError> {
        if overdraft_limit.is_negative() || debt.is_negative() {
            return Err(AmountError::Negative.into());
        }
        let mut book = AccountBook::new(overdraft_limit);
        book.debt = debt;
        book.totals = totals;
        for grant in grants {
            grant.validate()?;
            if book.grants.contains_key(&grant.id) {
                return Err(BookError::DuplicateGrant(grant.id));
            }
            book.grants.insert(grant.id.clone(), grant);
        }
        for (id, record) in debits {
            let consistent =
                record.refunded_draws.len() == record.plan.draws.len()
                    && record.plan.draws.iter().zip(&record.refunded_draws).all(
                        |(draw, refunded)| !refunded.is_negative() && *refunded <= draw.amount,
                    )
                    && !record.refunded_overdraft.is_negative()
                    && record.refunded_overdraft <= record.plan.overdraft;
            if !consistent {
                return Err(BookError::RefundExceedsDebit {
                    requested: record.refunded(),
                    refundable: record.amount(),
                });
            }
            if book.debits.insert(id, record).is_some() {
                return Err(BookError::DuplicateDebit);
            }
        }
        Ok(book)
    }

    pub fn overdraft_limit(&self) -> Credits {
        self.overdraft_limit
    }

    pub fn grants(&self) -> impl Iterator<Item = &Grant> + Clone {
        self.grants.values()
    }

    pub fn grant(&self, id: &GrantId) -> Option<&Grant> {
        self.grants.get(id)
    }

    pub fn debt(&self) -> Credits {
        self.debt
    }

    pub fn totals(&self) -> &Totals {
        &self.totals
    }

    pub fn debit_record(&self, id: &DebitId) -> Option<&DebitRecord> {
        self.debits.get(id)
    }

    pub fn hold(&self, id: &HoldId) -> Option<&Hold> {
        self.holds.get(id)
    }

    /// `Σ remaining − debt`.
    pub fn balance(&self) -> Credits {
        held_balance(self.grants.values(), self.debt).unwrap_or(Credits::MAX)
    }

    /// Credits reserved by pending holds. Every operation that takes a time first expires the
    /// holds whose TTL has passed by then, so this is always current for that time.
    pub fn reserved(&self) -> Reserved {
        let mut reserved = Reserved::default();
        for hold in self
            .holds
            .values()
            .filter(|h| h.status == HoldStatus::Pending)
        {
            // Sums are bounded by the grants' amounts, which fit.
            let _ = reserved.add(&hold.reserved);
        }
        reserved
    }

    /// Every invariant, plus "a closed grant keeps only what holds reserve on it".
    pub fn check(&self) -> Result<(), InvariantViolation> {
        check_invariants(&self.totals, self.grants.values(), self.debt)?;
        let reserved = self.reserved();
        for grant in self.grants.values().filter(|g| g.state != GrantState::Open) {
            if grant.remaining != reserved.on_grant(&grant.id) {
                return Err(InvariantViolation::GrantRemaining {
                    grant: grant.id.clone(),
                    remaining: grant.remaining,
                    amount: grant.amount,
                });
            }
        }
        Ok(())
    }

    /// Runs an operation all-or-nothing: on error the book is left exactly as it was.
    /// (A clone per operation is fine for a reference model; stores use transactions.)
    fn transact<T>(
        &mut self,
        operation: impl FnOnce(&mut AccountBook) -> Result<T, BookError>,
    ) -> Result<T, BookError> {
        let mut draft = self.clone();
        let result = operation(&mut draft)?;
        *self = draft;
        Ok(result)
    }

    fn record(&mut self, movements: &[Movement]) -> Result<(), BookError> {
        for movement in movements {
            self.totals.record(movement.kind, movement.amount)?;
        }
        Ok(())
    }

    fn insert_grant(
        &mut self,
        grant: Grant,
        kind: EntryKind,
        at: Timestamp,
    ) -> Result<Vec<Movement>, BookError> {
        grant.validate()?;
        if grant.remaining != grant.amount {
            return Err(GrantError::RemainingOutOfRange {
                remaining: grant.remaining,
                amount: grant.amount,
            }
            .into());
        }
        if self.grants.contains_key(&grant.id) {
            return Err(BookError::DuplicateGrant(grant.id));
        }
        let id = grant.id.clone();
        let mut movements = vec![Movement {
            kind,
            amount: grant.amount,
            grant_id: Some(id.clone()),
        }];
        self.grants.insert(id.clone(), grant);
        movements.extend(self.settle_from(&id, at, Credits::MAX));
        Ok(movements)
    }

    /// Debt is settled first by the next grant, once that grant is in effect: at most
    /// `at_most` of it.
    fn settle_from(&mut self, id: &GrantId, at: Timestamp, at_most: Credits) -> Option<Movement> {
        let grant = self.grants.get_mut(id)?;
        if !self.debt.is_positive() || !grant.is_active_at(at) {
            return None;
        }
        let amount = self.debt.min(grant.remaining).min(at_most);
        if !amount.is_positive() {
            return None;
        }
        grant.remaining = Credits::from_micros(grant.remaining.micros() - amount.micros());
        self.debt = Credits::from_micros(self.debt.micros() - amount.micros());
        Some(Movement {
            kind: EntryKind::Settle,
            amount,
            grant_id: Some(id.clone()),
        })
    }

    /// Settles up to `at_most` of the debt from one open grant in effect by `at`, as that
    /// grant did with the debt standing when it was issued. For debt run up before a grant was
    /// issued whose usage reached the ledger only after it: applied as it arrives, that usage
    /// would otherwise leave the debt standing beside the grant's credits, and the account's
    /// state would depend on the order its usage arrived in. A grant past its expiry that the
    /// expiry run has not closed yet still settles (it was in effect when issued, and what it
    /// settles is not left to expire). Settles nothing when there is no debt or the grant has
    /// nothing left.
    pub fn settle_debt(
        &mut self,
        id: &GrantId,
        at_most: Credits,
        at: Timestamp,
    ) -> Result<Vec<Movement>, BookError> {
        self.transact(|book| {
            let grant = book
                .grants
                .get(id)
                .ok_or_else(|| BookError::UnknownGrant(id.clone()))?;
            if grant.state != GrantState::Open || grant.effective_at > at {
                return Err(BookError::GrantClosed(id.clone()));
            }
            if at_most.is_negative() {
                return Err(AmountError::Negative.into());
            }
            // In effect at its start, so that `settle_from` takes it whatever `at` is.
            let from = grant.effective_at;
            let movements: Vec<Movement> =
                book.settle_from(id, from, at_most).into_iter().collect();
            book.record(&movements)?;
            Ok(movements)
        })
    }

    /// Adds new credits (purchase, subscription, promo, trial, top-up). Settles debt first.
    pub fn add_grant(&mut self, grant: Grant, at: Timestamp) -> Result<Vec<Movement>, BookError> {
        self.transact(|book| book.add_grant_inner(grant, at))
    }

    fn add_grant_inner(&mut self, grant: Grant, at: Timestamp) -> Result<Vec<Movement>, BookError> {
        if matches!(
            grant.source,
            GrantSource::Rollover | GrantSource::Refund | GrantSource::Adjustment
        ) {
            // These come from their own operations, which count them in their own terms.
            return Err(BookError::SourceNotAllowed(grant.source));
        }
        let mut movements = self.expire_holds_inner(at)?;
        let inserted = self.insert_grant(grant, EntryKind::Grant, at)?;
        self.record(&inserted)?;
        movements.extend(inserted);
        Ok(movements)
    }

    /// Plans and applies a debit, or refuses it with the shortfall and changes nothing.
    pub fn debit(
        &mut self,
        id: DebitId,
        feature: &FeatureKey,
        at: Timestamp,
        cost: Credits,
    ) -> Outcome<Vec<Movement>> {
        self.transact(|book| book.debit_inner(id, feature, at, cost))
    }

    fn debit_inner(
        &mut self,
        id: DebitId,
        feature: &FeatureKey,
        at: Timestamp,
        cost: Credits,
    ) -> Outcome<Vec<Movement>> {
        if self.debits.contains_key(&id) {
            return Err(BookError::DuplicateDebit);
        }
        let mut movements = self.expire_holds_inner(at)?;
        let request = BurnRequest {
            feature,
            at,
            cost,
            overdraft_limit: self.overdraft_limit,
            debt: self.debt,
        };
        match plan_burn(self.grants.values(), &self.reserved(), &request) {
            Ok(plan) => {
                movements.extend(self.apply_debit_inner(id, at, plan, true)?);
                Ok(Ok(movements))
            }
            Err(shortfall) => Ok(Err(shortfall)),
        }
    }

    /// Applies a debit whose draws were decided elsewhere (a region's store). Checks every draw
    /// against the grant as of the event time `at` and the overdraft against the limit.
    /// A replayed debit id is refused with [`BookError::DuplicateDebit`] and moves nothing.
    pub fn apply_debit(
        &mut self,
        id: DebitId,
        at: Timestamp,
        plan: BurnPlan,
        check_activity: bool,
    ) -> Result<Vec<Movement>, BookError> {
        self.transact(|book| book.apply_debit_inner(id, at, plan, check_activity))
    }

    fn apply_debit_inner(
        &mut self,
        id: DebitId,
        at: Timestamp,
        plan: BurnPlan,
        check_activity: bool,
    ) -> Result<Vec<Movement>, BookError> {
        if self.debits.contains_key(&id) {
            return Err(BookError::DuplicateDebit);
        }
        for draw in &plan.draws {
            let grant = self
                .grants
                .get(&draw.grant_id)
                .ok_or_else(|| BookError::UnknownGrant(draw.grant_id.clone()))?;
            if check_activity && !grant.is_active_at(at) {
                return Err(BookError::GrantClosed(draw.grant_id.clone()));
            }
            if draw.amount > grant.remaining || draw.amount.is_negative() {
                return Err(BookError::DrawExceedsGrant {
                    grant: draw.grant_id.clone(),
                    requested: draw.amount,
                    available: grant.remaining,
                });
            }
        }
        let room = self.overdraft_limit.saturating_sub_floor_zero(self.debt);
        if check_activity && plan.overdraft > room {
            return Err(BookError::OverdraftExceeded {
                requested: plan.overdraft,
                room,
            });
        }
        // Validated above: every subtraction stays within the grant, and debt stays in range.
        self.debt = self.debt.checked_add(plan.overdraft)?;
        let mut movements = Vec::with_capacity(plan.draws.len().saturating_add(1));
        for draw in &plan.draws {
            if let Some(grant) = self.grants.get_mut(&draw.grant_id) {
                grant.remaining = grant.remaining.checked_sub(draw.amount)?;
            }
            movements.push(Movement {
                kind: EntryKind::Debit,
                amount: draw.amount,
                grant_id: Some(draw.grant_id.clone()),
            });
        }
        if plan.overdraft.is_positive() {
            movements.push(Movement {
                kind: EntryKind::Debit,
                amount: plan.overdraft,
                grant_id: None,
            });
        }
        self.record(&movements)?;
        let record = DebitRecord {
            at,
            refunded_draws: vec![Credits::ZERO; plan.draws.len()],
            refunded_overdraft: Credits::ZERO,
            plan,
        };
        self.debits.insert(id, record);
        Ok(movements)
    }

    /// Sets credits aside for a hold, or refuses with the shortfall.
    pub fn authorize(
        &mut self,
        id: HoldId,
        feature: &FeatureKey,
        at: Timestamp,
        cost: Credits,
        expires_at: Timestamp,
    ) -> Outcome<Hold> {
        self.transact(|book| book.authorize_inner(id, feature, at, cost, expires_at))
    }

    fn authorize_inner(
        &mut self,
        id: HoldId,
        feature: &FeatureKey,
        at: Timestamp,
        cost: Credits,
        expires_at: Timestamp,
    ) -> Outcome<Hold> {
        if self.holds.contains_key(&id) {
            return Err(BookError::DuplicateHold);
        }
        self.expire_holds_inner(at)?;
        let request = BurnRequest {
            feature,
            at,
            cost,
            overdraft_limit: self.overdraft_limit,
            debt: self.debt,
        };
        match plan_burn(self.grants.values(), &self.reserved(), &request) {
            Ok(plan) => {
                let hold = Hold::new(id.clone(), feature.clone(), plan, at, expires_at);
                self.holds.insert(id, hold.clone());
                Ok(Ok(hold))
            }
            Err(shortfall) => Ok(Err(shortfall)),
        }
    }

    /// Captures up to the held amount as debit `debit_id`; the rest goes back.
    pub fn capture(
        &mut self,
        hold: &HoldId,
        amount: Credits,
        debit_id: DebitId,
        now: Timestamp,
    ) -> Result<Result<Vec<Movement>, HoldError>, BookError> {
        self.transact(|book| book.capture_inner(hold, amount, debit_id, now))
    }

    fn capture_inner(
        &mut self,
        hold: &HoldId,
        amount: Credits,
        debit_id: DebitId,
        now: Timestamp,
    ) -> Result<Result<Vec<Movement>, HoldError>, BookError> {
        if self.debits.contains_key(&debit_id) {
            return Err(BookError::DuplicateDebit);
        }
        let entry = self.holds.get_mut(hold).ok_or(BookError::UnknownHold)?;
        let created_at = entry.created_at;
        let capture = match entry.capture(amount, now) {
            Ok(capture) => capture,
            Err(refusal) => return Ok(Err(refusal)),
        };
        // The credits were set aside at authorization, so the debit stands even if a grant
        // has closed since: its event time is the authorization's.
        let mut movements =
            self.apply_debit_inner(debit_id, created_at, capture.captured, false)?;
        movements.extend(self.close_released(&capture.released)?);
        Ok(Ok(movements))
    }

    /// Releases a pending hold; returns the movements for parts of closed grants.
    pub fn release(
        &mut self,
        hold: &HoldId,
        now: Timestamp,
    ) -> Result<Result<Vec<Movement>, HoldError>, BookError> {
        self.transact(|book| book.release_inner(hold, now))
    }

    fn release_inner(
        &mut self,
        hold: &HoldId,
        now: Timestamp,
    ) -> Result<Result<Vec<Movement>, HoldError>, BookError> {
        let entry = self.holds.get_mut(hold).ok_or(BookError::UnknownHold)?;
        match entry.release(now) {
            Ok(released) => self.close_released(&released).map(Ok),
            Err(refusal) => Ok(Err(refusal)),
        }
    }

    /// Expires every hold whose TTL has passed, giving its credits back.
    pub fn expire_holds(&mut self, now: Timestamp) -> Result<Vec<Movement>, BookError> {
        self.transact(|book| book.expire_holds_inner(now))
    }

    fn expire_holds_inner(&mut self, now: Timestamp) -> Result<Vec<Movement>, BookError> {
        let mut released = Vec::new();
        for hold in self.holds.values_mut() {
            if let Ok(plan) = hold.expire(now) {
                released.push(plan);
            }
        }
        let mut movements = Vec::new();
        for plan in released {
            movements.extend(self.close_released(&plan)?);
        }
        Ok(movements)
    }

    /// Released credits of a grant that has closed meanwhile are closed the same way now.
    fn close_released(&mut self, released: &BurnPlan) -> Result<Vec<Movement>, BookError> {
        let mut movements = Vec::new();
        for draw in &released.draws {
            let Some(grant) = self.grants.get_mut(&draw.grant_id) else {
                continue;
            };
            let kind = match grant.state {
                GrantState::Open => continue,
                GrantState::Expired => EntryKind::Expire,
                GrantState::Voided => EntryKind::Void,
            };
            let amount = draw.amount.min(grant.remaining);
            grant.remaining = grant.remaining.checked_sub(amount)?;
            movements.push(Movement {
                kind,
                amount,
                grant_id: Some(draw.grant_id.clone()),
            });
        }
        self.record(&movements)?;
        Ok(movements)
    }

    /// Closes a grant: its unreserved remainder becomes an `expire` or `void` movement.
    fn close(
        &mut self,
        id: &GrantId,
        state: GrantState,
        kind: EntryKind,
    ) -> Result<Vec<Movement>, BookError> {
        let reserved = self.reserved().on_grant(id);
        let grant = self
            .grants
            .get_mut(id)
            .ok_or_else(|| BookError::UnknownGrant(id.clone()))?;
        if grant.state != GrantState::Open {
            return Err(BookError::GrantClosed(id.clone()));
        }
        let amount = grant.remaining.saturating_sub_floor_zero(reserved);
        grant.remaining = grant.remaining.checked_sub(amount)?;
        grant.state = state;
        let movements = vec![Movement {
            kind,
            amount,
            grant_id: Some(id.clone()),
        }];
        self.record(&movements)?;
        Ok(movements)
    }

    /// Expires a grant at or after its `expires_at`.
    pub fn expire(&mut self, id: &GrantId, at: Timestamp) -> Result<Vec<Movement>, BookError> {
        self.transact(|book| book.expire_inner(id, at))
    }

    fn expire_inner(&mut self, id: &GrantId, at: Timestamp) -> Result<Vec<Movement>, BookError> {
        let grant = self
            .grants
            .get(id)
            .ok_or_else(|| BookError::UnknownGrant(id.clone()))?;
        match grant.expires_at {
            Some(expires_at) if expires_at <= at => {
                let mut movements = self.expire_holds_inner(at)?;
                movements.extend(self.close(id, GrantState::Expired, EntryKind::Expire)?);
                Ok(movements)
            }
            expires_at => Err(BookError::NotYetExpired {
                grant: id.clone(),
                expires_at,
            }),
        }
    }

    /// Voids what is left of a grant (a refunded purchase).
    pub fn void(&mut self, id: &GrantId, at: Timestamp) -> Result<Vec<Movement>, BookError> {
        self.transact(|book| book.void_inner(id, at))
    }

    fn void_inner(&mut self, id: &GrantId, at: Timestamp) -> Result<Vec<Movement>, BookError> {
        let mut movements = self.expire_holds_inner(at)?;
        movements.extend(self.close(id, GrantState::Voided, EntryKind::Void)?);
        Ok(movements)
    }

    /// Refunds `amount` of a debit: the overdraft part first pays the debt back, then draws
    /// from last to first go back to their grants if still active at `at`; what cannot go back
    /// lands in a new `refund` grant with the priority and scope of the first grant it came from.
    pub fn refund(
        &mut self,
        debit: &DebitId,
        amount: Credits,
        at: Timestamp,
        terms: RefundGrantTerms,
    ) -> Result<Vec<Movement>, BookError> {
        self.transact(|book| book.refund_inner(debit, amount, at, terms))
    }

    fn refund_inner(
        &mut self,
        debit: &DebitId,
        amount: Credits,
        at: Timestamp,
        terms: RefundGrantTerms,
    ) -> Result<Vec<Movement>, BookError> {
        let record = self.debits.get(debit).ok_or(BookError::UnknownDebit)?;
        let refundable = record.amount().saturating_sub_floor_zero(record.refunded());
        if amount.is_negative() || amount > refundable {
            return Err(BookError::RefundExceedsDebit {
                requested: amount,
                refundable,
            });
        }
        let mut record = record.clone();
        let mut left = amount;
        let mut movements = Vec::new();
        let mut pool = Credits::ZERO;
        let mut pool_template: Option<Grant> = None;

        let from_overdraft = left.min(
            record
                .plan
                .overdraft
                .saturating_sub_floor_zero(record.refunded_overdraft),
        );
        if from_overdraft.is_positive() {
            let to_debt = from_overdraft.min(self.debt);
            self.debt = self.debt.checked_sub(to_debt)?;
            if to_debt.is_positive() {
                movements.push(Movement {
                    kind: EntryKind::Refund,
                    amount: to_debt,
                    grant_id: None,
                });
            }
            pool = pool.checked_add(from_overdraft.checked_sub(to_debt)?)?;
            record.refunded_overdraft = record.refunded_overdraft.checked_add(from_overdraft)?;
            left = left.checked_sub(from_overdraft)?;
        }
        for (index, draw) in record.plan.draws.iter().enumerate().rev() {
            if !left.is_positive() {
                break;
            }
            let portion = left.min(
                draw.amount
                    .saturating_sub_floor_zero(record.refunded_draws[index]),
            );
            if !portion.is_positive() {
                continue;
            }
            left = left.checked_sub(portion)?;
            record.refunded_draws[index] = record.refunded_draws[index].checked_add(portion)?;
            match self.grants.get_mut(&draw.grant_id) {
                Some(grant) if grant.is_active_at(at) => {
                    grant.remaining = grant.remaining.checked_add(portion)?;
                    debug_assert!(grant.remaining <= grant.amount);
                    movements.push(Movement {
                        kind: EntryKind::Refund,
                        amount: portion,
                        grant_id: Some(draw.grant_id.clone()),
                    });
                }
                grant => {
                    if pool_template.is_none() {
                        pool_template = grant.cloned();
                    }
                    pool = pool.checked_add(portion)?;
                }
            }
        }
        debug_assert!(left.is_zero());
        if pool.is_positive() {
            let mut grant = Grant::new(terms.id, pool, GrantSource::Refund, at);
            if let Some(template) = pool_template {
                grant = grant
                    .with_priority(template.priority)
                    .with_scope(template.scope);
            }
            grant.expires_at = terms.expires_at;
            movements.extend(self.insert_grant(grant, EntryKind::Refund, at)?);
        }
        self.record(&movements)?;
        self.debits.insert(debit.clone(), record);
        Ok(movements)
    }

    /// An operator's correction. Positive: a new `adjustment` grant. Negative: taken from
    /// active grants in burn-down order whatever their scope, the rest into debt.
    pub fn adjust(
        &mut self,
        amount: Credits,
        at: Timestamp,
        grant_id: GrantId,
    ) -> Result<Vec<Movement>, BookError> {
        self.adjust_leaving(amount, at, grant_id, &BTreeMap::new())
    }

    /// [`AccountBook::adjust`], where a negative adjustment leaves `out` of each grant (credits
    /// regions still hold, which they may yet spend) and takes from the next grants instead.
    pub fn adjust_leaving(
        &mut self,
        amount: Credits,
        at: Timestamp,
        grant_id: GrantId,
        out: &BTreeMap<GrantId, Credits>,
    ) -> Result<Vec<Movement>, BookError> {
        self.transact(|book| book.adjust_inner(amount, at, grant_id, out))
    }

    fn adjust_inner(
        &mut self,
        amount: Credits,
        at: Timestamp,
        grant_id: GrantId,
        out: &BTreeMap<GrantId, Credits>,
    ) -> Result<Vec<Movement>, BookError> {
        if amount.is_positive() {
            let grant = Grant::new(grant_id, amount, GrantSource::Adjustment, at);
            let movements = self.insert_grant(grant, EntryKind::Adjust, at)?;
            self.record(&movements)?;
            return Ok(movements);
        }
        let mut movements = self.expire_holds_inner(at)?;
        let reserved = self.reserved();
        let mut order: Vec<&Grant> = self
            .grants
            .values()
            .filter(|g| g.is_active_at(at))
            .collect();
        order.sort_by(|a, b| burn_order(a, b));
        let mut left = amount.checked_neg()?;
        let mut draws = Vec::new();
        for grant in order {
            let available = grant
                .remaining
                .saturating_sub_floor_zero(reserved.on_grant(&grant.id))
                .saturating_sub_floor_zero(out.get(&grant.id).copied().unwrap_or_default());
            let take = left.min(available);
            if take.is_positive() {
                draws.push(Draw {
                    grant_id: grant.id.clone(),
                    amount: take,
                });
                left = left.checked_sub(take)?;
            }
        }
        let mut adjusted = Vec::new();
        for draw in draws {
            if let Some(grant) = self.grants.get_mut(&draw.grant_id) {
                grant.remaining = grant.remaining.checked_sub(draw.amount)?;
            }
            adjusted.push(Movement {
                kind: EntryKind::Adjust,
                amount: draw.amount.checked_neg()?,
                grant_id: Some(draw.grant_id),
            });
        }
        if left.is_positive() {
            self.debt = self.debt.checked_add(left)?;
            adjusted.push(Movement {
                kind: EntryKind::Adjust,
                amount: left.checked_neg()?,
                grant_id: None,
            });
        }
        self.record(&adjusted)?;
        movements.extend(adjusted);
        Ok(movements)
    }

    /// Ends period `index` of a schedule whose grant for that period is in this book: carries
    /// what the policy allows into a rollover grant, expires the rest, issues the next grant.
    pub fn end_period(
        &mut self,
        schedule: &GrantSchedule,
        index: u64,
        at: Timestamp,
    ) -> Result<Result<Vec<Movement>, ScheduleError>, BookError> {
        self.transact(|book| book.end_period_inner(schedule, index, at))
    }

    fn end_period_inner(
        &mut self,
        schedule: &GrantSchedule,
        index: u64,
        at: Timestamp,
    ) -> Result<Result<Vec<Movement>, ScheduleError>, BookError> {
        let mut movements = match self.close_period_inner(schedule, index, at)? {
            Ok(movements) => movements,
            Err(error) => return Ok(Err(error)),
        };
        let next_grant = match index
            .checked_add(1)
            .ok_or(ScheduleError::OutOfRange)
            .and_then(|next| schedule.grant_for_period(next))
        {
            Ok(grant) => grant,
            Err(error) => return Ok(Err(error)),
        };
        let next = self.insert_grant(next_grant, EntryKind::Grant, at)?;
        self.record(&next)?;
        movements.extend(next);
        Ok(Ok(movements))
    }

    /// Closes period `index` of a schedule without issuing the next period's grant: carries
    /// what the policy allows into a rollover grant and expires the rest. The authority issues
    /// each period's grant on its boundary but closes the previous period only once every
    /// region has reconciled past its end, so late usage still burns the period's grant.
    pub fn close_period(
        &mut self,
        schedule: &GrantSchedule,
        index: u64,
        at: Timestamp,
    ) -> Result<Result<Vec<Movement>, ScheduleError>, BookError> {
        self.transact(|book| book.close_period_inner(schedule, index, at))
    }

    fn close_period_inner(
        &mut self,
        schedule: &GrantSchedule,
        index: u64,
        at: Timestamp,
    ) -> Result<Result<Vec<Movement>, ScheduleError>, BookError> {
        let Some(id) = schedule.grant_id(index) else {
            return Ok(Err(ScheduleError::OutOfRange));
        };
        let mut movements = self.expire_holds_inner(at)?;
        let reserved = self.reserved().on_grant(&id);
        let grant = self
            .grants
            .get(&id)
            .ok_or_else(|| BookError::UnknownGrant(id.clone()))?;
        if grant.state != GrantState::Open {
            return Err(BookError::GrantClosed(id));
        }
        let unreserved = grant.remaining.saturating_sub_floor_zero(reserved);
        let end = match schedule.end_period(index, unreserved) {
            Ok(end) => end,
            Err(error) => return Ok(Err(error)),
        };
        if grant.expires_at.is_none_or(|expires_at| at < expires_at) {
            return Err(BookError::NotYetExpired {
                grant: id,
                expires_at: grant.expires_at,
            });
        }
        if let Some(rollover) = end.rollover_grant {
            if let Some(grant) = self.grants.get_mut(&id) {
                grant.remaining = grant.remaining.checked_sub(rollover.amount)?;
            }
            let carried = Movement {
                kind: EntryKind::Rollover,
                amount: rollover.amount,
                grant_id: Some(id.clone()),
            };
            self.record(std::slice::from_ref(&carried))?;
            movements.push(carried);
            let inserted = self.insert_grant(rollover, EntryKind::Rollover, at)?;
            self.record(&inserted)?;
            movements.extend(inserted);
        }
        movements.extend(self.close(&id, GrantState::Expired, EntryKind::Expire)?);
        Ok(Ok(movements))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(millis: i64) -> Timestamp {
        Timestamp::from_millis(millis).unwrap()
    }

    fn credits(text: &str) -> Credits {
        Credits::parse(text).unwrap()
    }

    #[test]
    fn a_book_rebuilt_from_its_parts_behaves_like_the_original() {
        let feature = FeatureKey::new("f").unwrap();
        let mut book = AccountBook::new(credits("1"));
        let grant = Grant::new(
            GrantId::new("g").unwrap(),
            credits("10"),
            GrantSource::Purchase,
            at(0),
        );
        book.add_grant(grant, at(0)).unwrap();
        let debit = DebitId::new("d").unwrap();
        book.debit(debit.clone(), &feature, at(1), credits("4"))
            .unwrap()
            .unwrap();

        let mut rebuilt = AccountBook::from_parts(
            book.overdraft_limit(),
            book.debt(),
            *book.totals(),
            book.grants().cloned(),
            [(debit.clone(), book.debit_record(&debit).unwrap().clone())],
        )
        .unwrap();
        assert_eq!(rebuilt, book);
        let terms = || RefundGrantTerms {
            id: GrantId::new("r").unwrap(),
            expires_at: None,
        };
        assert_eq!(
            rebuilt.refund(&debit, credits("1"), at(2), terms()),
            book.refund(&debit, credits("1"), at(2), terms())
        );
        rebuilt.check().unwrap();
    }

    #[test]
    fn parts_that_break_invariants_are_refused() {
        let mut grant = Grant::new(
            GrantId::new("g").unwrap(),
            credits("10"),
            GrantSource::Purchase,
            at(0),
        );
        grant.remaining = credits("11");
        let refused =
            AccountBook::from_parts(Credits::ZERO, Credits::ZERO, Totals::default(), [grant], []);
        assert!(matches!(refused, Err(BookError::Grant(_))));
        let negative_debt =
            AccountBook::from_parts(Credits::ZERO, credits("-1"), Totals::default(), [], []);
        assert!(negative_debt.is_err());
        let record = DebitRecord {
            at: at(0),
            plan: BurnPlan {
                draws: vec![],
                overdraft: credits("1"),
            },
            refunded_draws: vec![],
            refunded_overdraft: credits("2"),
        };
        let over_refunded = AccountBook::from_parts(
            credits("5"),
            Credits::ZERO,
            Totals::default(),
            [],
            [(DebitId::new("d").unwrap(), record)],
        );
        assert!(matches!(
            over_refunded,
            Err(BookError::RefundExceedsDebit { .. })
        ));
    }
}
