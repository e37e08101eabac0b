//! The credit lifecycle on the authority's clock: recurring grants issued on their period
//! boundaries, periods closed with their rollover, grants expired, expiry notices, stuck holds
//! swept, idle allocations taken back.
//!
//! A period's grant is issued at its start. The period is closed (rollover and expiry), and
//! any other grant expired, only once every region's watermark has passed its end and no
//! region holds a pending hold for the account: a debit made before the end but reconciled
//! after it still burns the grant it was drawn from.

use tollgate_core::command::{
    CloseGrant, CloseKind, ClosePeriod, GrantTerms, IssueGrant, Memo, Metadata,
};
use tollgate_core::{AccountId, GrantSchedule, RegionId, Timestamp};
use tollgate_ledger::{GrantRecord, LedgerStore, RefusalCode};
use tollgate_region::RegionStore;
use tracing::{info, warn};

use crate::authority::Authority;
use crate::error::{AuthorityError, Result};
use crate::events::{Event, EventKind};
use crate::reconciler::derived_key;
use crate::settings::{
    SCHEDULER_WORK_PER_PASS_MAX, SCHEDULE_CATCH_UP_PERIODS_MAX, SWEEP_ACCOUNTS_PER_PASS_MAX,
};
use crate::state::ScheduleRecord;

/// Metadata key naming the schedule a period grant belongs to: those grants are closed with
/// their period (rollover), never by plain expiry.
pub const SCHEDULE_METADATA_KEY: &str = "tollgate.schedule";

/// What one scheduler pass did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TickReport {
    pub periods_issued: usize,
    pub periods_closed: usize,
    pub grants_expired: usize,
    /// Expiries (or period closes) waiting for a region's watermark or a pending hold.
    pub deferred: usize,
    /// Accounts whose expired holds and leases the regions were made to settle.
    pub accounts_swept: usize,
    pub allocations_taken_back: usize,
    /// Idempotency records older than the retention, forgotten.
    pub idempotency_pruned: u64,
    /// Regions that failed a call during the pass: their accounts were left for the next pass
    /// while every other region's were swept and taken back from.
    pub regions_failed: std::collections::BTreeSet<RegionId>,
}

fn invalid(field: &'static str) -> impl Fn(tollgate_core::ScheduleError) -> AuthorityError {
    move |e| AuthorityError::invalid(field, e)
}

impl<L: LedgerStore + ?Sized, R: RegionStore> Authority<L, R> {
    /// Stores a new recurring grant. Its first period is issued by the next pass.
    pub async fn create_schedule(
        &self,
        account: &AccountId,
        schedule: GrantSchedule,
        ends_at: Option<Timestamp>,
    ) -> Result<ScheduleRecord> {
        schedule.validate().map_err(invalid("schedule"))?;
        self.ledger.account(account).await?;
        let (start, end) = schedule.recurrence.period(0).map_err(invalid("anchor"))?;
        let record = ScheduleRecord {
            account: account.clone(),
            schedule,
            ends_at,
            cancelled_at: None,
            next_issue: 0,
            next_issue_at: start,
            next_close: 0,
            next_close_at: end,
        };
        self.state.create_schedule(&record).await
    }

    /// Stops issuing periods; periods already issued still close with their rollover.
    pub async fn cancel_schedule(&self, account: &AccountId, id: &str) -> Result<ScheduleRecord> {
        let mut record = self
            .state
            .schedule(account, id)
            .await?
            .ok_or_else(|| AuthorityError::NotFound(format!("schedule {id}")))?;
        if record.cancelled_at.is_none() {
            record.cancelled_at = Some(self.clock.now());
            self.state.save_schedule_progress(&record).await?;
        }
        Ok(record)
    }

    /// One pass of the lifecycle.
    pub async fn tick(&self) -> Result<TickReport> {
        let now = self.clock.now();
        let through = self.reconciled_through().await?;
        let mut report = TickReport::default();
        self.run_schedules(now, through, &mut report).await?;
        if let Some(through) = through {
            self.expire_grants(through, &mut report).await?;
        }
        self.notice_expiring(now).await?;
        report.accounts_swept = self.sweep_holds(now, &mut report.regions_failed).await?;
        report.allocations_taken_back = self.take_back_idle(&mut report.regions_failed).await?;
        if !report.regions_failed.is_empty() {
            warn!(regions = ?report.regions_failed, "lifecycle pass: regions that did not answer were left for the next pass");
        }
        let forget_before = Timestamp::from_millis(
            now.millis()
                .saturating_sub(self.settings.idempotency_retention_ms),
        )
        .unwrap_or(Timestamp::EPOCH);
        report.idempotency_pruned = self
            .ledger
            .prune_idempotency(
                forget_before,
                crate::settings::IDEMPOTENCY_PRUNE_PER_PASS_MAX,
            )
            .await?;
        Ok(report)
    }

    async fn run_schedules(
        &self,
        now: Timestamp,
        through: Option<Timestamp>,
        report: &mut TickReport,
    ) -> Result<()> {
        let close_by = through.unwrap_or(Timestamp::EPOCH);
        let due = self
            .state
            .due_schedules(now, close_by, SCHEDULER_WORK_PER_PASS_MAX)
            .await?;
        for mut record in due {
            // Close first: a rollover grant must exist before the next period is spent from.
            report.periods_closed += self.close_periods(&mut record, through, report).await?;
            report.periods_issued += self.issue_periods(&mut record, now).await?;
            self.state.save_schedule_progress(&record).await?;
        }
        Ok(())
    }

    async fn issue_periods(&self, record: &mut ScheduleRecord, now: Timestamp) -> Result<usize> {
        let mut issued = 0;
        // A cancellation stops periods starting at or after it (a plan change may cancel at
        // the next boundary, ahead of time).
        while record
            .cancelled_at
            .is_none_or(|cancelled| record.next_issue_at < cancelled)
            && record.next_issue_at <= now
            && record.ends_at.is_none_or(|end| record.next_issue_at < end)
            && (issued as u64) < SCHEDULE_CATCH_UP_PERIODS_MAX
        {
            let grant = record
                .schedule
                .grant_for_period(record.next_issue)
                .map_err(invalid("schedule"))?;
            let key = derived_key("period", &[record.account.as_str(), grant.id.as_str()])?;
            let metadata = Metadata::new(
                [(SCHEDULE_METADATA_KEY.to_owned(), record.schedule.id.clone())].into(),
            )
            .map_err(|e| AuthorityError::invalid("schedule_id", e))?;
            let command = IssueGrant {
                key,
                account: record.account.clone(),
                terms: GrantTerms {
                    id: grant.id.clone(),
                    amount: grant.amount,
                    source: grant.source,
                    priority: Some(grant.priority),
                    effective_at: Some(grant.effective_at),
                    expires_at: grant.expires_at,
                    scope: grant.scope.clone(),
                    cost_basis: None,
                    external_ref: None,
                },
                metadata,
                memo: Memo::new(format!(
                    "schedule {} period {}",
                    record.schedule.id, record.next_issue
                ))
                .map_err(|e| AuthorityError::invalid("memo", e))?,
            };
            match self.ledger.issue_grant(command, now).await? {
                Ok(_) => {}
                Err(refusal) if refusal.code == RefusalCode::DuplicateGrant => {}
                Err(refusal) => {
                    warn!(account = %record.account, schedule = %record.schedule.id, %refusal.message, "period not issued");
                    return Ok(issued);
                }
            }
            info!(account = %record.account, grant = %grant.id, "period issued");
            record.next_issue += 1;
            record.next_issue_at = record
                .schedule
                .recurrence
                .boundary(record.next_issue)
                .map_err(invalid("schedule"))?;
            issued += 1;
            self.mark_dirty(&record.account);
            self.rebalance(&record.account).await?;
        }
        Ok(issued)
    }

    async fn close_periods(
        &self,
        record: &mut ScheduleRecord,
        through: Option<Timestamp>,
        report: &mut TickReport,
    ) -> Result<usize> {
        let mut closed = 0;
        while record.next_close < record.next_issue
            && (closed as u64) < SCHEDULE_CATCH_UP_PERIODS_MAX
        {
            let closing = record.schedule.grant_id(record.next_close);
            if through.is_none_or(|t| t < record.next_close_at)
                || self
                    .holds_pending_on(&record.account, closing.as_ref())
                    .await?
            {
                report.deferred += 1;
                break;
            }
            let now = self.clock.now();
            let key = derived_key(
                "close",
                &[
                    record.account.as_str(),
                    &record.schedule.id,
                    &record.next_close.to_string(),
                ],
            )?;
            let command = ClosePeriod {
                key,
                account: record.account.clone(),
                schedule: record.schedule.clone(),
                index: record.next_close,
                memo: Memo::default(),
            };
            match self.ledger.close_period(command, now).await? {
                Ok(_) => {}
                // Voided or expired by an operator: nothing left to roll over.
                Err(refusal) if refusal.code == RefusalCode::GrantClosed => {}
                Err(refusal) => {
                    warn!(account = %record.account, %refusal.message, "period not closed");
                    break;
                }
            }
            if let Some(grant) = record.schedule.grant_id(record.next_close) {
                self.forget_grant_allocations(&record.account, &grant)
                    .await?;
            }
            record.next_close += 1;
            record.next_close_at = record
                .schedule
                .recurrence
                .period(record.next_close)
                .map_err(invalid("schedule"))?
                .1;
            closed += 1;
            self.mark_dirty(&record.account);
            self.rebalance(&record.account).await?;
        }
        Ok(closed)
    }

    /// True when a region holds a pending hold drawing on `grant`: its capture carries the
    /// authorization's time and may burn the grant about to expire or close. Holds on the
    /// account's other grants do not hold this one back (an account with steady holds, a
    /// stream of model calls say, would otherwise never see its grants expire or roll over).
    /// `None` (the grant's id could not be named) waits for any pending hold.
    async fn holds_pending_on(
        &self,
        account: &AccountId,
        grant: Option<&tollgate_core::GrantId>,
    ) -> Result<bool> {
        let now = self.clock.now();
        for (region, store) in &self.regions {
            let view = store
                .view(account, now)
                .await
                .map_err(|e| AuthorityError::region(region, e))?;
            let waits = match grant {
                Some(grant) => view.held_grants.contains(grant),
                None => view.holds_pending > 0,
            };
            if waits {
                return Ok(true);
            }
        }
        Ok(false)
    }

    async fn expire_grants(&self, through: Timestamp, report: &mut TickReport) -> Result<()> {
        let due = self
            .ledger
            .grants_expiring(through, SCHEDULER_WORK_PER_PASS_MAX)
            .await?;
        for record in due {
            if record.grant.expires_at.is_none_or(|e| e > through) {
                continue;
            }
            if record
                .metadata
                .entries()
                .contains_key(SCHEDULE_METADATA_KEY)
            {
                continue;
            }
            if self
                .holds_pending_on(&record.account, Some(&record.grant.id))
                .await?
            {
                report.deferred += 1;
                continue;
            }
            if self.expire_grant(&record).await? {
                report.grants_expired += 1;
            }
        }
        Ok(())
    }

    async fn expire_grant(&self, record: &GrantRecord) -> Result<bool> {
        let now = self.clock.now();
        let key = derived_key(
            "expire",
            &[record.account.as_str(), record.grant.id.as_str()],
        )?;
        let command = CloseGrant {
            key,
            account: record.account.clone(),
            grant: record.grant.id.clone(),
            kind: CloseKind::Expire,
            memo: Memo::default(),
        };
        let done = match self.ledger.close_grant(command, now).await? {
            Ok(_) => true,
            Err(refusal) => {
                warn!(account = %record.account, grant = %record.grant.id, %refusal.message, "expiry refused");
                false
            }
        };
        self.forget_grant_allocations(&record.account, &record.grant.id)
            .await?;
        self.mark_dirty(&record.account);
        Ok(done)
    }

    /// A closed grant's segments expired in the regions at the same instant; whatever is left
    /// there is taken back so the regions' views stay clean.
    pub(crate) async fn forget_grant_allocations(
        &self,
        account: &AccountId,
        grant: &tollgate_core::GrantId,
    ) -> Result<()> {
        let now = self.clock.now();
        let regions: Vec<RegionId> = self.regions.keys().cloned().collect();
        for region in &regions {
            // The grant is closed in the ledger: its segments are dead in the regions too.
            self.take_back_grant(region, account, grant, None, now)
                .await?;
        }
        self.state
            .forget_allocations_of(account, grant.as_str())
            .await
    }

    /// `grant.expiring` once per grant, `expiring_notice_ms` ahead.
    async fn notice_expiring(&self, now: Timestamp) -> Result<()> {
        let horizon = Timestamp::from_millis(now.millis() + self.settings.expiring_notice_ms)
            .unwrap_or(Timestamp::MAX);
        let soon = self
            .ledger
            .grants_expiring(horizon, SCHEDULER_WORK_PER_PASS_MAX)
            .await?;
        let endpoints = self.endpoint_names();
        for record in soon {
            let Some(expires_at) = record.grant.expires_at else {
                continue;
            };
            if expires_at <= now || !record.grant.remaining.is_positive() {
                continue;
            }
            let event = Event::new(
                EventKind::GrantExpiring,
                &record.account,
                record.grant.id.as_str(),
                now,
            )
            .with("grant_id", &record.grant.id)
            .with("remaining", record.grant.remaining)
            .with("expires_at", expires_at);
            if self.state.insert_event(&event, &endpoints, now).await? {
                let _ = self.events.send(event);
            }
        }
        Ok(())
    }

    /// Every regional store settles expired holds and leases when an account is touched;
    /// reading the account touches it, so credits of abandoned holds come back. A region that
    /// fails a call is added to `failed` and skipped for the rest of the pass: one region down
    /// holds no other back (and costs one failed call per pass, not one per account).
    async fn sweep_holds(
        &self,
        now: Timestamp,
        failed: &mut std::collections::BTreeSet<RegionId>,
    ) -> Result<usize> {
        let mut swept = 0;
        for seen in self
            .state
            .region_accounts(SWEEP_ACCOUNTS_PER_PASS_MAX)
            .await?
        {
            if failed.contains(&seen.region) {
                continue;
            }
            let Ok(store) = self.region(&seen.region) else {
                continue;
            };
            match store.view(&seen.account, now).await {
                Ok(_) => swept += 1,
                Err(error) => {
                    warn!(region = %seen.region, %error, "hold sweep: the region did not answer");
                    failed.insert(seen.region.clone());
                }
            }
        }
        Ok(swept)
    }
}
