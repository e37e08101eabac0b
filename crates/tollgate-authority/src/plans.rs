//! Plans and contracts: what an account subscribes to, and what it negotiated.
//!
//! A plan bundles recurring grants (amount, period, rollover, priority, scope); its price
//! overrides live in the price book under the plan's id. Assigning a plan creates one
//! schedule per bundled grant; changing plans ends the old schedules and starts the new ones
//! under a stated proration policy:
//!
//! - [`Proration::NextPeriod`]: the old plan runs to the end of its current period; the new
//!   plan's periods start at that boundary. Nothing is granted now.
//! - [`Proration::ProratedNow`]: the old plan stops issuing now (its current grants still
//!   close at their period end, with their rollover); for every grant of the new plan, the
//!   increase over the old plan's grant of the same key, times the fraction of the current
//!   period still ahead, is granted now (rounded down to the micro-credit) and expires at the
//!   period's end, where the new plan's full periods begin. A downgrade grants nothing now.
//!
//! On an upgrade (the new plan's `tier` is higher), credits that expired within the grace
//! period before the change are reinstated as grants expiring with the current period: the
//! "my credits expired yesterday and I upgraded today" case. Every grant the change issues
//! has an id derived from the change's idempotency key, so a retried change grants nothing
//! twice.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tollgate_core::command::{GrantTerms, IssueGrant, Memo, Metadata};
use tollgate_core::{
    AccountId, Contract, Credits, EntryKind, GrantId, GrantSchedule, GrantSource, Period, PlanId,
    Recurrence, RolloverPolicy, Scope, Timestamp,
};
use tollgate_ledger::{EntryFilter, LedgerStore, PageRequest, PAGE_SIZE_MAX};
use tollgate_region::RegionStore;

use crate::authority::Authority;
use crate::error::{AuthorityError, Result};
use crate::reconciler::derived_key;
use crate::state::ScheduleRecord;

/// Grants one plan may bundle.
pub const PLAN_GRANTS_MAX: usize = 16;
/// Contracts one account may have (past, present and future).
pub const CONTRACTS_PER_ACCOUNT_MAX: usize = 64;
/// The longest reinstatement grace accepted (90 days).
pub const REINSTATE_GRACE_MS_MAX: i64 = 90 * 24 * 3_600_000;
/// Expire entries one plan change reads back at most when reinstating.
const REINSTATE_ENTRIES_MAX: usize = 10_000;
/// Metadata key naming the plan a schedule or grant belongs to.
pub const PLAN_METADATA_KEY: &str = "tollgate.plan";
/// Metadata key naming the grant a reinstated grant restores.
pub const REINSTATED_METADATA_KEY: &str = "tollgate.reinstated_from";

/// One recurring grant of a plan.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanGrant {
    /// Names the grant within the plan (`monthly`, `bonus`); matches grants across plans for
    /// proration.
    pub key: String,
    pub amount: Credits,
    pub period: Period,
    pub rollover: RolloverPolicy,
    pub priority: u32,
    pub scope: Scope,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    pub id: PlanId,
    pub description: String,
    /// Orders plans: moving to a higher tier is an upgrade.
    pub tier: u32,
    pub grants: Vec<PlanGrant>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Proration {
    #[default]
    NextPeriod,
    ProratedNow,
}

/// A change of an account's plan.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlanChange {
    /// Makes the change's schedules and grants unique and its retries harmless.
    pub key: String,
    /// `None` removes the plan (the old schedules end by the policy).
    pub plan: Option<PlanId>,
    pub proration: Proration,
    /// On an upgrade, credits that expired this long before the change are reinstated.
    pub reinstate_grace_ms: i64,
}

/// What a plan change did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PlanChangeReport {
    pub previous: Option<PlanId>,
    pub upgrade: bool,
    /// Schedules created for the new plan.
    pub schedules: Vec<String>,
    /// Grants issued now: prorations and reinstatements, with their amounts.
    pub granted: Vec<(GrantId, Credits)>,
    /// When the new plan's full periods begin.
    pub starts_at: Option<Timestamp>,
}

impl Plan {
    /// Every problem of the plan, each naming its field; empty when it is good.
    pub fn problems(&self) -> Vec<(String, String)> {
        let mut problems = Vec::new();
        if self.grants.is_empty() {
            problems.push(("plan.grants".to_owned(), "at least one grant".to_owned()));
        }
        if self.grants.len() > PLAN_GRANTS_MAX {
            problems.push((
                "plan.grants".to_owned(),
                format!("{} grants, at most {PLAN_GRANTS_MAX}", self.grants.len()),
            ));
        }
        let mut keys = std::collections::BTreeSet::new();
        for (n, grant) in self.grants.iter().enumerate() {
            let field = |name: &str| format!("plan.grants[{n}].{name}");
            if grant.key.is_empty()
                || grant.key.len() > 32
                || !grant
                    .key
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
            {
                problems.push((field("key"), "1 to 32 of [A-Za-z0-9_-]".to_owned()));
            }
            if !keys.insert(grant.key.as_str()) {
                problems.push((field("key"), format!("{} appears twice", grant.key)));
            }
            if !grant.amount.is_positive() {
                problems.push((field("amount"), "must be positive".to_owned()));
            }
            if let Err(error) = grant.rollover.validate() {
                problems.push((field("rollover"), error.to_string()));
            }
        }
        problems
    }

    fn schedule_for(&self, grant: &PlanGrant, id: String, anchor: Timestamp) -> GrantSchedule {
        GrantSchedule {
            id,
            recurrence: Recurrence {
                anchor,
                period: grant.period,
            },
            amount: grant.amount,
            priority: grant.priority,
            scope: grant.scope.clone(),
            source: GrantSource::Subscription,
            rollover: grant.rollover,
        }
    }
}

/// Every problem of an account's contracts, each naming its field: periods in order and never
/// overlapping, discounts in (0, 10], locked versions that exist, at most
/// [`CONTRACTS_PER_ACCOUNT_MAX`].
pub fn contract_problems(
    account: &AccountId,
    contracts: &[Contract],
    known_versions: &[u64],
) -> Vec<(String, String)> {
    let mut problems = Vec::new();
    if contracts.len() > CONTRACTS_PER_ACCOUNT_MAX {
        problems.push((
            "contracts".to_owned(),
            format!(
                "{} contracts, at most {CONTRACTS_PER_ACCOUNT_MAX}",
                contracts.len()
            ),
        ));
    }
    for (n, contract) in contracts.iter().enumerate() {
        let field = |name: &str| format!("contracts[{n}].{name}");
        if contract.account_id != *account {
            problems.push((field("account_id"), "another account's contract".to_owned()));
        }
        if contract
            .effective_until
            .is_some_and(|until| until <= contract.effective_from)
        {
            problems.push((
                field("effective_until"),
                "must be after effective_from".to_owned(),
            ));
        }
        if let Some(multiplier) = contract.discount_multiplier {
            if multiplier <= rust_decimal::Decimal::ZERO || multiplier > rust_decimal::Decimal::TEN
            {
                problems.push((
                    field("discount_multiplier"),
                    format!("{multiplier}: must be above 0 and at most 10"),
                ));
            }
        }
        if let Some(locked) = contract.locked_version {
            if !known_versions.contains(&locked) {
                problems.push((
                    field("locked_version"),
                    format!("price book version {locked} does not exist"),
                ));
            }
        }
        for (m, other) in contracts.iter().enumerate().skip(n + 1) {
            let ends_before = |a: &Contract, b: &Contract| {
                a.effective_until
                    .is_some_and(|until| until <= b.effective_from)
            };
            if !ends_before(contract, other) && !ends_before(other, contract) {
                problems.push((
                    field("effective_from"),
                    format!("the period overlaps contracts[{m}]"),
                ));
            }
        }
    }
    problems
}

/// One `INVALID_ARGUMENT` naming every problem.
pub fn refuse(problems: Vec<(String, String)>) -> Result<()> {
    if problems.is_empty() {
        return Ok(());
    }
    let field = if problems.len() == 1 {
        "request"
    } else {
        "request (several problems)"
    };
    let message = problems
        .iter()
        .map(|(field, problem)| format!("{field}: {problem}"))
        .collect::<Vec<_>>()
        .join("; ");
    Err(AuthorityError::invalid(field, message))
}

fn short_digest(text: &str) -> String {
    hex::encode(&Sha256::digest(text.as_bytes())[..6])
}

impl<L: LedgerStore + ?Sized, R: RegionStore> Authority<L, R> {
    /// Defines a plan; the same plan again is a replay, another with its id a conflict. Every
    /// problem is named at once.
    pub async fn define_plan(&self, plan: &Plan) -> Result<()> {
        refuse(plan.problems())?;
        self.state.define_plan(plan).await.map(|_| ())
    }

    /// Sets every contract of an account (replacing what it had) after checking them as a
    /// whole, then publishes them to the regions, where edges price with the one in force.
    pub async fn set_contracts(&self, account: &AccountId, contracts: Vec<Contract>) -> Result<()> {
        self.ledger.account(account).await?;
        let versions: Vec<u64> = self
            .state
            .price_versions()
            .await?
            .iter()
            .map(|v| v.version)
            .collect();
        let mut problems = contract_problems(account, &contracts, &versions);
        let features = self.known_features().await?;
        for (n, contract) in contracts.iter().enumerate() {
            for feature in contract.rates.keys() {
                if !features.contains(feature) {
                    problems.push((
                        format!("contracts[{n}].rates[{feature}]"),
                        "unknown feature".to_owned(),
                    ));
                }
            }
        }
        refuse(problems)?;
        self.state.set_contracts(account, &contracts).await?;
        self.publish_summary_everywhere(account).await
    }

    /// Moves an account to another plan (or off its plan) under the change's policy.
    pub async fn change_plan(
        &self,
        account: &AccountId,
        change: &PlanChange,
    ) -> Result<PlanChangeReport> {
        if !(0..=REINSTATE_GRACE_MS_MAX).contains(&change.reinstate_grace_ms) {
            return Err(AuthorityError::invalid(
                "reinstate_grace",
                format!("at most {REINSTATE_GRACE_MS_MAX} ms"),
            ));
        }
        self.ledger.account(account).await?;
        let new_plan = match &change.plan {
            Some(id) => Some(
                self.state
                    .plan(id)
                    .await?
                    .ok_or_else(|| AuthorityError::NotFound(format!("plan {id}")))?,
            ),
            None => None,
        };
        let lock = self.account_lock(account);
        let held = lock.lock().await;
        let now = self.clock.now();
        let mut settings = self.state.account_settings(account).await?;
        let previous = settings.plan.clone();
        let mut report = PlanChangeReport {
            previous: previous.clone(),
            ..PlanChangeReport::default()
        };
        if previous == change.plan {
            return Ok(report);
        }
        let old_plan = match &previous {
            Some(id) => self.state.plan(id).await?,
            None => None,
        };
        let old_schedules = self.plan_schedules(account, previous.as_ref(), now).await?;
        report.upgrade = match (&old_plan, &new_plan) {
            (Some(old), Some(new)) => new.tier > old.tier,
            (None, Some(_)) => false,
            _ => false,
        };
        // Where the current period ends: the old plan's next boundary, or now without one.
        let boundary = old_schedules
            .iter()
            .map(|r| r.next_issue_at)
            .filter(|at| *at > now)
            .min()
            .unwrap_or(now);
        let stop_at = match change.proration {
            Proration::NextPeriod => boundary,
            Proration::ProratedNow => now,
        };
        for mut record in old_schedules.iter().cloned() {
            if record.cancelled_at.is_none_or(|c| c > stop_at) {
                record.cancelled_at = Some(stop_at);
                self.state.save_schedule_progress(&record).await?;
            }
        }
        let tag = short_digest(&change.key);
        if let Some(plan) = &new_plan {
            report.starts_at = Some(boundary);
            for grant in &plan.grants {
                let id = format!("plan.{}.{}.{tag}", plan.id, grant.key);
                let schedule = plan.schedule_for(grant, id.clone(), boundary);
                schedule
                    .validate()
                    .map_err(|e| AuthorityError::invalid("plan", e))?;
                let (start, end) = schedule
                    .recurrence
                    .period(0)
                    .map_err(|e| AuthorityError::invalid("plan", e))?;
                self.state
                    .create_schedule(&ScheduleRecord {
                        account: account.clone(),
                        schedule,
                        ends_at: None,
                        cancelled_at: None,
                        next_issue: 0,
                        next_issue_at: start,
                        next_close: 0,
                        next_close_at: end,
                    })
                    .await?;
                report.schedules.push(id);
            }
            if change.proration == Proration::ProratedNow && boundary > now {
                self.prorate(
                    account,
                    change,
                    &tag,
                    plan,
                    old_plan.as_ref(),
                    &old_schedules,
                    now,
                    boundary,
                    &mut report,
                )
                .await?;
            }
            if report.upgrade && change.reinstate_grace_ms > 0 {
                self.reinstate(account, change, &tag, plan, now, boundary, &mut report)
                    .await?;
            }
        }
        settings.plan = change.plan.clone();
        self.state.set_account_settings(account, &settings).await?;
        drop(held);
        self.publish_summary_everywhere(account).await?;
        Ok(report)
    }

    /// The schedules of the account's current plan still issuing at `now`.
    async fn plan_schedules(
        &self,
        account: &AccountId,
        plan: Option<&PlanId>,
        now: Timestamp,
    ) -> Result<Vec<ScheduleRecord>> {
        let Some(plan) = plan else {
            return Ok(Vec::new());
        };
        let prefix = format!("plan.{plan}.");
        let mut found = Vec::new();
        let mut after = String::new();
        loop {
            let page = self.state.schedules(account, &after, 500).await?;
            let Some(last) = page.last() else {
                return Ok(found);
            };
            after = last.schedule.id.clone();
            found.extend(page.into_iter().filter(|r| {
                r.schedule.id.starts_with(&prefix) && r.cancelled_at.is_none_or(|c| c > now)
            }));
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn prorate(
        &self,
        account: &AccountId,
        change: &PlanChange,
        tag: &str,
        plan: &Plan,
        old_plan: Option<&Plan>,
        old_schedules: &[ScheduleRecord],
        now: Timestamp,
        boundary: Timestamp,
        report: &mut PlanChangeReport,
    ) -> Result<()> {
        // The current period of the old plan: from its last boundary to the next.
        let period_start = old_schedules
            .iter()
            .filter(|r| r.next_issue > 0)
            .filter_map(|r| r.schedule.recurrence.boundary(r.next_issue - 1).ok())
            .max()
            .unwrap_or(now);
        let length = boundary.millis() - period_start.millis();
        let ahead = boundary.millis() - now.millis();
        if length <= 0 || ahead <= 0 {
            return Ok(());
        }
        for grant in &plan.grants {
            let before = old_plan
                .and_then(|p| p.grants.iter().find(|g| g.key == grant.key))
                .map_or(0, |g| g.amount.micros());
            let increase = i128::from(grant.amount.micros() - before);
            if increase <= 0 {
                continue;
            }
            // Rounded down: proration never grants a fraction of a micro-credit too much.
            let micros = increase * i128::from(ahead) / i128::from(length);
            let micros = i64::try_from(micros).map_err(AuthorityError::corrupt)?;
            if micros <= 0 {
                continue;
            }
            let id = GrantId::new(format!("plan.{}.{}.{tag}.prorated", plan.id, grant.key))
                .map_err(|e| AuthorityError::invalid("plan", e))?;
            let terms = GrantTerms {
                id: id.clone(),
                amount: Credits::from_micros(micros),
                source: GrantSource::Subscription,
                priority: Some(grant.priority),
                effective_at: Some(now),
                expires_at: Some(boundary),
                scope: grant.scope.clone(),
                cost_basis: None,
                external_ref: None,
            };
            self.issue_change_grant(account, change, &plan.id, terms, None, now)
                .await?;
            report.granted.push((id, Credits::from_micros(micros)));
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    async fn reinstate(
        &self,
        account: &AccountId,
        change: &PlanChange,
        tag: &str,
        plan: &Plan,
        now: Timestamp,
        boundary: Timestamp,
        report: &mut PlanChangeReport,
    ) -> Result<()> {
        let since = Timestamp::from_millis(now.millis() - change.reinstate_grace_ms)
            .map_err(AuthorityError::corrupt)?;
        let mut filter = EntryFilter::account(account.clone());
        filter.kinds = vec![EntryKind::Expire];
        filter.from = Some(since);
        let mut expired: Vec<(GrantId, Credits)> = Vec::new();
        let mut page = PageRequest {
            size: PAGE_SIZE_MAX,
            token: None,
        };
        loop {
            let found = self.ledger.entries(&filter, page.clone()).await?;
            for entry in &found.items {
                if let Some(grant) = &entry.grant_id {
                    if entry.event_at >= since
                        && entry.event_at <= now
                        && entry.amount.is_positive()
                    {
                        expired.push((grant.clone(), entry.amount));
                    }
                }
            }
            match found.next_token {
                Some(token) if expired.len() < REINSTATE_ENTRIES_MAX => page.token = Some(token),
                _ => break,
            }
        }
        // Credits restored through the new plan's current period (or a day when it has none).
        let expires_at = if boundary > now {
            boundary
        } else {
            Timestamp::from_millis(now.millis() + 24 * 3_600_000)
                .map_err(AuthorityError::corrupt)?
        };
        let priority = plan.grants.iter().map(|g| g.priority).min().unwrap_or(0);
        for (grant, amount) in expired {
            let id = GrantId::new(format!("{grant}.reinstated.{tag}"))
                .map_err(|e| AuthorityError::invalid("plan", e))?;
            let terms = GrantTerms {
                id: id.clone(),
                amount,
                source: GrantSource::Subscription,
                priority: Some(priority),
                effective_at: Some(now),
                expires_at: Some(expires_at),
                scope: Scope::All,
                cost_basis: None,
                external_ref: None,
            };
            self.issue_change_grant(account, change, &plan.id, terms, Some(&grant), now)
                .await?;
            report.granted.push((id, amount));
        }
        Ok(())
    }

    async fn issue_change_grant(
        &self,
        account: &AccountId,
        change: &PlanChange,
        plan: &PlanId,
        terms: GrantTerms,
        reinstated_from: Option<&GrantId>,
        now: Timestamp,
    ) -> Result<()> {
        let key = derived_key(
            "plan-change",
            &[account.as_str(), &change.key, terms.id.as_str()],
        )?;
        let mut labels = vec![(PLAN_METADATA_KEY.to_owned(), plan.to_string())];
        if let Some(from) = reinstated_from {
            labels.push((REINSTATED_METADATA_KEY.to_owned(), from.to_string()));
        }
        let metadata = Metadata::new(labels.into_iter().collect())
            .map_err(|e| AuthorityError::invalid("plan", e))?;
        let memo = Memo::new(format!("plan change to {plan}"))
            .map_err(|e| AuthorityError::invalid("plan", e))?;
        let outcome = self
            .ledger
            .issue_grant(
                IssueGrant {
                    key,
                    account: account.clone(),
                    terms,
                    metadata,
                    memo,
                },
                now,
            )
            .await?;
        if let Err(refusal) = outcome {
            return Err(AuthorityError::invalid("plan", refusal.message));
        }
        Ok(())
    }

    async fn known_features(
        &self,
    ) -> Result<std::collections::BTreeSet<tollgate_core::FeatureKey>> {
        let mut known = std::collections::BTreeSet::new();
        let mut after = String::new();
        loop {
            let page = self.state.features(&after, 1_000).await?;
            let Some(last) = page.last() else {
                return Ok(known);
            };
            after = last.feature.to_string();
            known.extend(page.into_iter().map(|f| f.feature));
        }
    }

    /// Every problem of a price book version against what the authority knows: features
    /// that were never defined and overrides for plans that do not exist.
    pub async fn price_version_problems(
        &self,
        version: &tollgate_core::PriceBookVersion,
    ) -> Result<Vec<(String, String)>> {
        let features = self.known_features().await?;
        let mut problems = Vec::new();
        let mut check_rates = |field: String, rates: &tollgate_core::price::Rates| {
            for feature in rates.keys() {
                if !features.contains(feature) {
                    problems.push((format!("{field}[{feature}]"), "unknown feature".to_owned()));
                }
            }
        };
        check_rates("version.default_rates".to_owned(), &version.default);
        for (region, rates) in &version.regions {
            check_rates(format!("version.region_rates[{region}]"), rates);
        }
        for (plan, rates) in &version.plans {
            check_rates(format!("version.plan_rates[{plan}]"), rates);
        }
        for ((plan, region), rates) in &version.plan_regions {
            check_rates(format!("version.plan_region_rates[{plan}/{region}]"), rates);
        }
        let plans: Vec<&PlanId> = version
            .plans
            .keys()
            .chain(version.plan_regions.keys().map(|(plan, _)| plan))
            .collect();
        for plan in plans {
            if self.state.plan(plan).await?.is_none() {
                problems.push((
                    format!("version.plan_rates[{plan}]"),
                    "unknown plan (define it first)".to_owned(),
                ));
            }
        }
        problems.dedup();
        Ok(problems)
    }
}
