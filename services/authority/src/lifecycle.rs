//! The Admin calls the authority's lifecycle owns — features, price book versions, schedules,
//! usage and revenue reports, events — decoded, handed to `tollgate-authority`, encoded.

use std::collections::BTreeMap;
use std::time::Duration;

use rust_decimal::Decimal;
use tollgate_authority::insights::{Bucket, BurnRank, GroupBy, RevenueLine, UsageRow};
use tollgate_authority::plans::{Plan, PlanChange, PlanChangeReport};
use tollgate_authority::state::ScheduleRecord;
use tollgate_authority::{
    AccountSettings, Authority, AuthorityError, Event, Feature, SettingsChange, TopUpSettings,
};
use tollgate_core::{
    AccountId, Audience, Contract, GrantSchedule, PeriodUnit, PlanId, PriceBookVersion, Rate,
    Recurrence, RegionId, RolloverPolicy, Timestamp,
};
use tollgate_ledger::{DebitQuery, LedgerStore};
use tollgate_proto::{decode, pb, ServiceError};
use tollgate_region::{AccountView, EnforcementMode, RegionStore};
use tonic::Status;

use crate::coordination::authority_error;

/// Items one list call returns by default and at most.
pub const LIST_SIZE_DEFAULT: u32 = 100;
pub const LIST_SIZE_MAX: u32 = 1_000;
/// Rates one price book version may carry across all its tables.
pub const VERSION_RATES_MAX: usize = 100_000;
/// How long a watcher waits for a wake-up before it looks at the outbox again.
pub const WATCH_POLL_MS: u64 = 1_000;
/// Events buffered per watcher.
pub const WATCH_BUFFER: usize = 256;

/// What the Admin service needs of the authority, without its type parameters.
#[tonic::async_trait]
pub trait Lifecycle: Send + Sync + 'static {
    async fn define_feature(&self, feature: Feature) -> Result<(), AuthorityError>;
    async fn features(&self, after: String, limit: u32) -> Result<Vec<Feature>, AuthorityError>;
    async fn publish_price_version(&self, version: PriceBookVersion) -> Result<(), AuthorityError>;
    async fn price_versions(&self) -> Result<Vec<PriceBookVersion>, AuthorityError>;
    async fn price_version_problems(
        &self,
        version: PriceBookVersion,
    ) -> Result<Problems, AuthorityError>;
    async fn define_plan(&self, plan: Plan) -> Result<(), AuthorityError>;
    async fn plans(&self, after: String, limit: u32) -> Result<Vec<Plan>, AuthorityError>;
    async fn change_plan(
        &self,
        account: AccountId,
        change: PlanChange,
    ) -> Result<PlanChangeReport, AuthorityError>;
    async fn set_contracts(
        &self,
        account: AccountId,
        contracts: Vec<Contract>,
    ) -> Result<(), AuthorityError>;
    async fn contracts(&self, account: AccountId) -> Result<Vec<Contract>, AuthorityError>;
    /// What each region holds for the account now: segments, holds in flight, edge leases,
    /// overdraft room; a region that does not answer says why.
    async fn region_views(
        &self,
        account: AccountId,
    ) -> Vec<(RegionId, Result<AccountView, String>)>;
    /// Appends a change made outside the Admin gRPC service (the console) to the audit table.
    async fn record_change(
        &self,
        entry: tollgate_authority::state::AuditEntry,
    ) -> Result<(), AuthorityError>;
    async fn create_schedule(
        &self,
        account: AccountId,
        schedule: GrantSchedule,
        ends_at: Option<Timestamp>,
    ) -> Result<ScheduleRecord, AuthorityError>;
    async fn cancel_schedule(
        &self,
        account: AccountId,
        id: String,
    ) -> Result<ScheduleRecord, AuthorityError>;
    async fn schedules(
        &self,
        account: AccountId,
        after: String,
        limit: u32,
    ) -> Result<Vec<ScheduleRecord>, AuthorityError>;
    async fn usage_breakdown(
        &self,
        query: DebitQuery,
        bucket: Option<Bucket>,
        group_by: GroupBy,
    ) -> Result<Vec<UsageRow>, AuthorityError>;
    async fn revenue_report(&self, query: DebitQuery) -> Result<Vec<RevenueLine>, AuthorityError>;
    async fn burn_ranking(
        &self,
        from: Timestamp,
        until: Timestamp,
        limit: usize,
    ) -> Result<(Vec<BurnRank>, Vec<BurnRank>), AuthorityError>;
    async fn events_after(
        &self,
        after: i64,
        account: Option<AccountId>,
        limit: u32,
    ) -> Result<Vec<(i64, Event)>, AuthorityError>;
    async fn event_position(&self, event_id: String) -> Result<Option<i64>, AuthorityError>;
    fn subscribe(&self) -> tokio::sync::broadcast::Receiver<Event>;
    async fn account_settings(&self, account: AccountId)
        -> Result<AccountSettings, AuthorityError>;
    async fn update_settings(
        &self,
        account: AccountId,
        change: SettingsChange,
    ) -> Result<AccountSettings, AuthorityError>;
    /// Closes grants or takes credits away after taking them back from every region (a void, a
    /// refunded purchase, a negative adjustment): see `tollgate_authority::closing`.
    fn closer(&self) -> &dyn tollgate_authority::GrantCloser;
}

#[tonic::async_trait]
impl<R: RegionStore> Lifecycle for Authority<dyn LedgerStore, R> {
    fn closer(&self) -> &dyn tollgate_authority::GrantCloser {
        self
    }
    async fn define_feature(&self, feature: Feature) -> Result<(), AuthorityError> {
        Authority::define_feature(self, &feature).await
    }
    async fn features(&self, after: String, limit: u32) -> Result<Vec<Feature>, AuthorityError> {
        self.state().features(&after, limit).await
    }
    async fn publish_price_version(&self, version: PriceBookVersion) -> Result<(), AuthorityError> {
        Authority::publish_price_version(self, &version).await
    }
    async fn price_versions(&self) -> Result<Vec<PriceBookVersion>, AuthorityError> {
        self.state().price_versions().await
    }
    async fn price_version_problems(
        &self,
        version: PriceBookVersion,
    ) -> Result<Problems, AuthorityError> {
        Authority::price_version_problems(self, &version).await
    }
    async fn define_plan(&self, plan: Plan) -> Result<(), AuthorityError> {
        Authority::define_plan(self, &plan).await
    }
    async fn plans(&self, after: String, limit: u32) -> Result<Vec<Plan>, AuthorityError> {
        self.state().plans(&after, limit).await
    }
    async fn change_plan(
        &self,
        account: AccountId,
        change: PlanChange,
    ) -> Result<PlanChangeReport, AuthorityError> {
        Authority::change_plan(self, &account, &change).await
    }
    async fn set_contracts(
        &self,
        account: AccountId,
        contracts: Vec<Contract>,
    ) -> Result<(), AuthorityError> {
        Authority::set_contracts(self, &account, contracts).await
    }
    async fn contracts(&self, account: AccountId) -> Result<Vec<Contract>, AuthorityError> {
        self.state().contracts(&account).await
    }
    async fn record_change(
        &self,
        entry: tollgate_authority::state::AuditEntry,
    ) -> Result<(), AuthorityError> {
        let now = tollgate_authority::Clock::now(self.clock().as_ref());
        self.state().append_audit(&entry, now).await
    }
    async fn region_views(
        &self,
        account: AccountId,
    ) -> Vec<(RegionId, Result<AccountView, String>)> {
        let now = tollgate_authority::Clock::now(self.clock().as_ref());
        let mut views = Vec::new();
        for (region, store) in self.regions() {
            let view = store.view(&account, now).await.map_err(|e| e.to_string());
            views.push((region.clone(), view));
        }
        views
    }
    async fn create_schedule(
        &self,
        account: AccountId,
        schedule: GrantSchedule,
        ends_at: Option<Timestamp>,
    ) -> Result<ScheduleRecord, AuthorityError> {
        Authority::create_schedule(self, &account, schedule, ends_at).await
    }
    async fn cancel_schedule(
        &self,
        account: AccountId,
        id: String,
    ) -> Result<ScheduleRecord, AuthorityError> {
        Authority::cancel_schedule(self, &account, &id).await
    }
    async fn schedules(
        &self,
        account: AccountId,
        after: String,
        limit: u32,
    ) -> Result<Vec<ScheduleRecord>, AuthorityError> {
        self.state().schedules(&account, &after, limit).await
    }
    async fn usage_breakdown(
        &self,
        query: DebitQuery,
        bucket: Option<Bucket>,
        group_by: GroupBy,
    ) -> Result<Vec<UsageRow>, AuthorityError> {
        Authority::usage_breakdown(self, &query, bucket, group_by).await
    }
    async fn revenue_report(&self, query: DebitQuery) -> Result<Vec<RevenueLine>, AuthorityError> {
        Authority::revenue_report(self, &query).await
    }
    async fn burn_ranking(
        &self,
        from: Timestamp,
        until: Timestamp,
        limit: usize,
    ) -> Result<(Vec<BurnRank>, Vec<BurnRank>), AuthorityError> {
        Authority::burn_ranking(self, from, until, limit).await
    }
    async fn events_after(
        &self,
        after: i64,
        account: Option<AccountId>,
        limit: u32,
    ) -> Result<Vec<(i64, Event)>, AuthorityError> {
        self.state()
            .events_after(after, account.as_ref(), limit)
            .await
    }
    async fn event_position(&self, event_id: String) -> Result<Option<i64>, AuthorityError> {
        self.state().event_position(&event_id).await
    }
    fn subscribe(&self) -> tokio::sync::broadcast::Receiver<Event> {
        Authority::subscribe(self)
    }
    async fn account_settings(
        &self,
        account: AccountId,
    ) -> Result<AccountSettings, AuthorityError> {
        self.state().account_settings(&account).await
    }
    async fn update_settings(
        &self,
        account: AccountId,
        change: SettingsChange,
    ) -> Result<AccountSettings, AuthorityError> {
        Authority::update_settings(self, &account, &change).await
    }
}

/// The settings part of an UpdateAccount request, every field validated.
pub fn settings_change_from_pb(
    request: &pb::UpdateAccountRequest,
) -> Result<SettingsChange, Status> {
    let optional_credits =
        |field: &str, text: &str| -> Result<Option<tollgate_core::Credits>, Status> {
            if text.is_empty() {
                return Ok(None);
            }
            Ok(Some(decode::non_negative_credits(field, text)?))
        };
    let low_balance = request
        .low_balance
        .as_deref()
        .map(|text| optional_credits("low_balance", text))
        .transpose()?;
    let top_up = match (&request.top_up, request.clear_top_up) {
        (Some(_), true) => {
            return Err(invalid(
                "clear_top_up",
                "set together with top_up; send one or the other",
            ))
        }
        (None, true) => Some(None),
        (None, false) => None,
        (Some(top_up), false) => Some(Some(TopUpSettings {
            hook_url: top_up.hook_url.clone(),
            secret: top_up.secret.clone(),
            threshold: decode::non_negative_credits("top_up.threshold", &top_up.threshold)?,
            amount: decode::positive_credits("top_up.amount", &top_up.amount)?,
            monthly_cap: decode::positive_credits("top_up.monthly_cap", &top_up.monthly_cap)?,
        })),
    };
    let plan = match request.plan.as_deref() {
        None => None,
        Some("") => Some(None),
        Some(text) => Some(Some(decode::id::<PlanId>("plan", text)?)),
    };
    let mode = match pb::EnforcementMode::try_from(request.mode) {
        Ok(pb::EnforcementMode::Unspecified) => None,
        Ok(pb::EnforcementMode::Strict) => Some(EnforcementMode::Strict),
        Ok(pb::EnforcementMode::Cached) => Some(EnforcementMode::Cached),
        Err(_) => return Err(invalid("mode", format!("unknown value {}", request.mode))),
    };
    Ok(SettingsChange {
        low_balance,
        top_up,
        plan,
        mode,
    })
}

/// An account's settings as replies carry them; the top-up secret never leaves.
pub fn settings_to_pb(settings: &AccountSettings) -> pb::AccountSettings {
    pb::AccountSettings {
        low_balance: settings
            .low_balance
            .map(|c| c.to_string())
            .unwrap_or_default(),
        top_up: settings.top_up.as_ref().map(|t| pb::TopUpSettings {
            hook_url: t.hook_url.clone(),
            secret: String::new(),
            threshold: t.threshold.to_string(),
            amount: t.amount.to_string(),
            monthly_cap: t.monthly_cap.to_string(),
            has_secret: !t.secret.is_empty(),
        }),
        plan: settings
            .plan
            .as_ref()
            .map(ToString::to_string)
            .unwrap_or_default(),
        mode: match settings.mode {
            EnforcementMode::Strict => pb::EnforcementMode::Strict,
            EnforcementMode::Cached => pb::EnforcementMode::Cached,
        }
        .into(),
    }
}

fn invalid(field: &str, message: impl ToString) -> Status {
    ServiceError::invalid(field, message.to_string()).into()
}

pub(crate) fn list_size(size: u32) -> Result<u32, Status> {
    match size {
        0 => Ok(LIST_SIZE_DEFAULT),
        size if size <= LIST_SIZE_MAX => Ok(size),
        size => Err(invalid(
            "page_size",
            format!("{size}, at most {LIST_SIZE_MAX} allowed"),
        )),
    }
}

pub fn feature_from_pb(feature: Option<pb::Feature>) -> Result<Feature, Status> {
    let feature = feature.ok_or_else(|| invalid("feature", "must be set"))?;
    if feature.unit.is_empty() || feature.unit.len() > 64 {
        return Err(invalid("feature.unit", "must be 1..=64 bytes"));
    }
    Ok(Feature {
        feature: decode::id("feature.feature", &feature.feature)?,
        unit: feature.unit,
        description: decode::memo("feature.description", &feature.description)?
            .as_str()
            .to_owned(),
    })
}

pub fn feature_to_pb(feature: &Feature) -> pb::Feature {
    pb::Feature {
        feature: feature.feature.to_string(),
        unit: feature.unit.clone(),
        description: feature.description.clone(),
    }
}

pub async fn list_features(
    lifecycle: &dyn Lifecycle,
    request: pb::ListFeaturesRequest,
) -> Result<pb::ListFeaturesReply, Status> {
    let size = list_size(request.page_size)?;
    let after = decode::page_token("page_token", &request.page_token)?.unwrap_or_default();
    let features = lifecycle
        .features(after, size)
        .await
        .map_err(authority_error)?;
    let next_page_token = if features.len() == size as usize {
        features
            .last()
            .map(|f| f.feature.to_string())
            .unwrap_or_default()
    } else {
        String::new()
    };
    Ok(pb::ListFeaturesReply {
        features: features.iter().map(feature_to_pb).collect(),
        next_page_token,
    })
}

/// Problems found while decoding a request, each naming its field; reported all at once.
pub type Problems = Vec<(String, String)>;

/// One `INVALID_ARGUMENT` naming every problem: `"<field>: <problem>; <field>: <problem>"`.
pub fn refuse_all(problems: Problems) -> Result<(), Status> {
    if problems.is_empty() {
        return Ok(());
    }
    let message = problems
        .iter()
        .map(|(field, problem)| format!("{field}: {problem}"))
        .collect::<Vec<_>>()
        .join("; ");
    Err(ServiceError::new(tollgate_proto::ErrorCode::InvalidArgument, message).into())
}

fn rates(
    field: &str,
    table: Option<&pb::RateTable>,
    count: &mut usize,
    problems: &mut Problems,
) -> tollgate_core::price::Rates {
    let mut rates = BTreeMap::new();
    for (feature, rate) in table.map(|t| &t.rates).into_iter().flatten() {
        *count += 1;
        if *count > VERSION_RATES_MAX {
            problems.push((
                field.to_owned(),
                format!("at most {VERSION_RATES_MAX} rates"),
            ));
            return rates;
        }
        let key = match decode::id(&format!("{field}.rates"), feature) {
            Ok(key) => key,
            Err(_) => {
                problems.push((
                    format!("{field}.rates[{feature}]"),
                    "not a feature key".into(),
                ));
                continue;
            }
        };
        match Rate::parse(rate) {
            Ok(rate) => {
                rates.insert(key, rate);
            }
            Err(error) => problems.push((format!("{field}.rates[{feature}]"), error.to_string())),
        }
    }
    rates
}

/// Decodes a price book version, collecting every problem instead of stopping at the first.
/// The version holds what could be decoded (for the checks against known features and plans)
/// and is `None` only when the message is missing its number or time.
pub fn price_version_parts(
    version: Option<pb::PriceBookVersion>,
) -> (Option<PriceBookVersion>, Problems) {
    let mut problems = Problems::new();
    let Some(version) = version else {
        problems.push(("version".into(), "must be set".into()));
        return (None, problems);
    };
    let effective_from = match version.effective_from.as_ref() {
        None => {
            problems.push(("version.effective_from".into(), "must be set".into()));
            None
        }
        Some(at) => match decode::timestamp("version.effective_from", at) {
            Ok(at) => Some(at),
            Err(error) => {
                problems.push(("version.effective_from".into(), error.message.clone()));
                None
            }
        },
    };
    let audience = match pb::Audience::try_from(version.audience) {
        Ok(pb::Audience::NewAccounts) => Audience::NewAccounts,
        Ok(pb::Audience::AllAccounts | pb::Audience::Unspecified) => Audience::AllAccounts,
        Err(_) => {
            problems.push(("version.audience".into(), "unknown value".into()));
            Audience::AllAccounts
        }
    };
    if version.version == 0 {
        problems.push(("version.version".into(), "must be more than zero".into()));
    }
    let mut count = 0;
    let mut regions = BTreeMap::new();
    for (region, table) in &version.region_rates {
        let field = format!("version.region_rates[{region}]");
        let rates = rates(&field, Some(table), &mut count, &mut problems);
        match decode::id::<RegionId>("version.region_rates", region) {
            Ok(id) => {
                regions.insert(id, rates);
            }
            Err(_) => problems.push((field, "not a region id".into())),
        }
    }
    let mut plans = BTreeMap::new();
    for (plan, table) in &version.plan_rates {
        let field = format!("version.plan_rates[{plan}]");
        let rates = rates(&field, Some(table), &mut count, &mut problems);
        match decode::id::<PlanId>("version.plan_rates", plan) {
            Ok(id) => {
                plans.insert(id, rates);
            }
            Err(_) => problems.push((field, "not a plan id".into())),
        }
    }
    let mut plan_regions = BTreeMap::new();
    for (key, table) in &version.plan_region_rates {
        let field = format!("version.plan_region_rates[{key}]");
        let rates = rates(&field, Some(table), &mut count, &mut problems);
        let parsed = key.split_once('/').and_then(|(plan, region)| {
            Some((
                decode::id::<PlanId>("plan", plan).ok()?,
                decode::id::<RegionId>("region", region).ok()?,
            ))
        });
        match parsed {
            Some(key) => {
                plan_regions.insert(key, rates);
            }
            None => problems.push((field, "keys are \"plan/region\"".into())),
        }
    }
    let default = rates(
        "version.default_rates",
        version.default_rates.as_ref(),
        &mut count,
        &mut problems,
    );
    let decoded = effective_from.map(|effective_from| PriceBookVersion {
        version: version.version,
        effective_from,
        audience,
        default,
        regions,
        plans,
        plan_regions,
    });
    (decoded, problems)
}

fn table(rates: &tollgate_core::price::Rates) -> pb::RateTable {
    pb::RateTable {
        rates: rates
            .iter()
            .map(|(feature, rate)| {
                (
                    feature.to_string(),
                    rate.as_decimal().normalize().to_string(),
                )
            })
            .collect(),
    }
}

pub fn price_version_to_pb(version: &PriceBookVersion) -> pb::PriceBookVersion {
    pb::PriceBookVersion {
        version: version.version,
        effective_from: Some(decode::timestamp_to_pb(version.effective_from)),
        audience: match version.audience {
            Audience::AllAccounts => pb::Audience::AllAccounts,
            Audience::NewAccounts => pb::Audience::NewAccounts,
        }
        .into(),
        default_rates: Some(table(&version.default)),
        region_rates: version
            .regions
            .iter()
            .map(|(r, t)| (r.to_string(), table(t)))
            .collect(),
        plan_rates: version
            .plans
            .iter()
            .map(|(p, t)| (p.to_string(), table(t)))
            .collect(),
        plan_region_rates: version
            .plan_regions
            .iter()
            .map(|((p, r), t)| (format!("{p}/{r}"), table(t)))
            .collect(),
    }
}

pub(crate) fn rollover_from_pb(
    rollover: Option<&pb::RolloverPolicy>,
) -> Result<RolloverPolicy, Status> {
    use pb::rollover_policy::Policy;
    let policy = match rollover.and_then(|r| r.policy.as_ref()) {
        None | Some(Policy::None(_)) => RolloverPolicy::None,
        Some(Policy::Full(_)) => RolloverPolicy::Full,
        Some(Policy::Max(cap)) => RolloverPolicy::Max {
            cap: decode::non_negative_credits("schedule.rollover.max", cap)?,
        },
        Some(Policy::Percent(percent)) => RolloverPolicy::Percent {
            percent: percent
                .percent
                .parse::<Decimal>()
                .map_err(|e| invalid("schedule.rollover.percent.percent", e))?,
            cap: (!percent.cap.is_empty())
                .then(|| {
                    decode::non_negative_credits("schedule.rollover.percent.cap", &percent.cap)
                })
                .transpose()?,
        },
    };
    policy
        .validate()
        .map_err(|e| invalid("schedule.rollover", e))?;
    Ok(policy)
}

pub(crate) fn rollover_to_pb(policy: &RolloverPolicy) -> pb::RolloverPolicy {
    use pb::rollover_policy::{Percent, Policy};
    let policy = match policy {
        RolloverPolicy::None => Policy::None(true),
        RolloverPolicy::Full => Policy::Full(true),
        RolloverPolicy::Max { cap } => Policy::Max(cap.to_string()),
        RolloverPolicy::Percent { percent, cap } => Policy::Percent(Percent {
            percent: percent.normalize().to_string(),
            cap: cap.map(|c| c.to_string()).unwrap_or_default(),
        }),
    };
    pb::RolloverPolicy {
        policy: Some(policy),
    }
}

/// Schedule ids become part of grant ids (`<schedule>.p<k>.rollover`), so they follow the
/// grant id rules with room for the suffix.
pub const SCHEDULE_ID_LEN_MAX: usize = 96;

pub fn schedule_from_pb(
    schedule: Option<pb::Schedule>,
) -> Result<(AccountId, GrantSchedule, Option<Timestamp>), Status> {
    let schedule = schedule.ok_or_else(|| invalid("schedule", "must be set"))?;
    if schedule.schedule_id.is_empty() || schedule.schedule_id.len() > SCHEDULE_ID_LEN_MAX {
        return Err(invalid(
            "schedule.schedule_id",
            format!("must be 1..={SCHEDULE_ID_LEN_MAX} bytes"),
        ));
    }
    decode::id::<tollgate_core::GrantId>("schedule.schedule_id", &schedule.schedule_id)?;
    let account = decode::id("schedule.account_id", &schedule.account_id)?;
    let unit = period_unit_from_pb(schedule.period_unit)
        .map_err(|e| invalid("schedule.period_unit", e))?;
    let anchor = decode::timestamp(
        "schedule.anchor",
        schedule
            .anchor
            .as_ref()
            .ok_or_else(|| invalid("schedule.anchor", "must be set"))?,
    )?;
    let count = if schedule.period_count == 0 {
        1
    } else {
        schedule.period_count
    };
    let recurrence =
        Recurrence::new(anchor, unit, count).map_err(|e| invalid("schedule.period_count", e))?;
    let source = decode::issuable_source("schedule.source", schedule.source)?;
    let grant_schedule = GrantSchedule {
        id: schedule.schedule_id,
        recurrence,
        amount: decode::positive_credits("schedule.amount", &schedule.amount)?,
        priority: schedule.priority.unwrap_or(source.default_priority()),
        scope: decode::scope("schedule.scope", schedule.scope.as_ref())?,
        source,
        rollover: rollover_from_pb(schedule.rollover.as_ref())?,
    };
    let ends_at = schedule
        .ends_at
        .as_ref()
        .map(|at| decode::timestamp("schedule.ends_at", at))
        .transpose()?;
    Ok((account, grant_schedule, ends_at))
}

pub(crate) fn period_unit_from_pb(unit: i32) -> Result<PeriodUnit, String> {
    match pb::PeriodUnit::try_from(unit) {
        Ok(pb::PeriodUnit::Day) => Ok(PeriodUnit::Day),
        Ok(pb::PeriodUnit::Week) => Ok(PeriodUnit::Week),
        Ok(pb::PeriodUnit::Month) => Ok(PeriodUnit::Month),
        Ok(pb::PeriodUnit::Year) => Ok(PeriodUnit::Year),
        _ => Err("must be day, week, month or year".to_owned()),
    }
}

pub(crate) fn period_unit_to_pb(unit: PeriodUnit) -> pb::PeriodUnit {
    match unit {
        PeriodUnit::Day => pb::PeriodUnit::Day,
        PeriodUnit::Week => pb::PeriodUnit::Week,
        PeriodUnit::Month => pb::PeriodUnit::Month,
        PeriodUnit::Year => pb::PeriodUnit::Year,
    }
}

pub fn schedule_to_pb(record: &ScheduleRecord) -> pb::Schedule {
    let s = &record.schedule;
    let unit = period_unit_to_pb(s.recurrence.period.unit);
    let features = match &s.scope {
        tollgate_core::Scope::All => Vec::new(),
        tollgate_core::Scope::Features(f) => f.iter().map(ToString::to_string).collect(),
    };
    pb::Schedule {
        schedule_id: s.id.clone(),
        account_id: record.account.to_string(),
        amount: s.amount.to_string(),
        period_unit: unit.into(),
        period_count: s.recurrence.period.count,
        anchor: Some(decode::timestamp_to_pb(s.recurrence.anchor)),
        source: decode::grant_source_to_pb(s.source).into(),
        priority: Some(s.priority),
        scope: Some(pb::Scope { features }),
        rollover: Some(rollover_to_pb(&s.rollover)),
        ends_at: record.ends_at.map(decode::timestamp_to_pb),
    }
}

pub fn window(
    from: Option<&prost_types::Timestamp>,
    until: Option<&prost_types::Timestamp>,
    account: &str,
) -> Result<DebitQuery, Status> {
    let from = from
        .map(|t| decode::timestamp("from", t))
        .transpose()?
        .unwrap_or(Timestamp::EPOCH);
    let until = until
        .map(|t| decode::timestamp("until", t))
        .transpose()?
        .unwrap_or(Timestamp::MAX);
    if until <= from {
        return Err(invalid("until", "must be after from"));
    }
    Ok(DebitQuery {
        account: decode::optional_id("account_id", account)?,
        from,
        until,
    })
}

pub async fn usage_breakdown(
    lifecycle: &dyn Lifecycle,
    request: pb::GetUsageBreakdownRequest,
) -> Result<pb::GetUsageBreakdownReply, Status> {
    let query = window(
        request.from.as_ref(),
        request.until.as_ref(),
        &request.account_id,
    )?;
    let bucket = match pb::Bucket::try_from(request.bucket) {
        Ok(pb::Bucket::Hour) => Some(Bucket::Hour),
        Ok(pb::Bucket::Day) => Some(Bucket::Day),
        Ok(pb::Bucket::Month) => Some(Bucket::Month),
        Ok(pb::Bucket::Unspecified) => None,
        Err(_) => return Err(invalid("bucket", "unknown value")),
    };
    let mut group_by = GroupBy::default();
    for dimension in &request.group_by {
        match pb::UsageDimension::try_from(*dimension) {
            Ok(pb::UsageDimension::Feature) => group_by.feature = true,
            Ok(pb::UsageDimension::Actor) => group_by.actor = true,
            Ok(pb::UsageDimension::Region) => group_by.region = true,
            _ => return Err(invalid("group_by", "unknown dimension")),
        }
    }
    let rows = lifecycle
        .usage_breakdown(query, bucket, group_by)
        .await
        .map_err(authority_error)?;
    Ok(pb::GetUsageBreakdownReply {
        rows: rows
            .iter()
            .map(|row| pb::UsageRow {
                bucket_start: row.key.bucket_start.map(decode::timestamp_to_pb),
                feature: row.key.feature.clone(),
                actor_id: row.key.actor.clone(),
                region: row.key.region.clone(),
                credits: row.credits.to_string(),
                debits: row.debits,
            })
            .collect(),
    })
}

pub async fn revenue_report(
    lifecycle: &dyn Lifecycle,
    request: pb::GetRevenueReportRequest,
) -> Result<pb::GetRevenueReportReply, Status> {
    let query = window(
        request.from.as_ref(),
        request.until.as_ref(),
        &request.account_id,
    )?;
    let lines = lifecycle
        .revenue_report(query)
        .await
        .map_err(authority_error)?;
    let money = |d: Decimal| d.normalize().to_string();
    Ok(pb::GetRevenueReportReply {
        lines: lines
            .iter()
            .map(|l| pb::RevenueLine {
                currency: l.currency.clone(),
                credits_sold: l.credits_sold.to_string(),
                money_sold: money(l.money_sold),
                credits_consumed: l.credits_consumed.to_string(),
                money_consumed: money(l.money_consumed),
                credits_expired: l.credits_expired.to_string(),
                money_breakage: money(l.money_breakage),
                credits_refunded: l.credits_refunded.to_string(),
                money_refunded: money(l.money_refunded),
                credits_voided: l.credits_voided.to_string(),
                money_voided: money(l.money_voided),
            })
            .collect(),
    })
}

pub fn event_to_pb(event: &Event) -> pb::Event {
    pb::Event {
        event_id: event.event_id.clone(),
        r#type: event.kind.as_str().to_owned(),
        account_id: event.account.to_string(),
        occurred_at: Some(decode::timestamp_to_pb(event.occurred_at)),
        attributes: event.attributes.clone().into_iter().collect(),
    }
}

pub type EventStream =
    std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::Event, Status>> + Send>>;

/// Events from the outbox in order, from after `after_event_id` (or from now on), then live:
/// the outbox is the order of record, and the broadcast only wakes the watcher early.
pub async fn watch(
    lifecycle: std::sync::Arc<dyn Lifecycle>,
    request: pb::WatchEventsRequest,
) -> Result<EventStream, Status> {
    let account: Option<AccountId> = decode::optional_id("account_id", &request.account_id)?;
    let kinds = request
        .types
        .iter()
        .map(|t| {
            tollgate_authority::EventKind::parse(t)
                .ok_or_else(|| invalid("types", format!("unknown event type {t:?}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mut position = if request.after_event_id.is_empty() {
        // From now on: the newest position.
        let mut last = 0;
        loop {
            let page = lifecycle
                .events_after(last, account.clone(), LIST_SIZE_MAX)
                .await
                .map_err(authority_error)?;
            match page.last() {
                Some((seq, _)) => last = *seq,
                None => break last,
            }
        }
    } else {
        lifecycle
            .event_position(request.after_event_id.clone())
            .await
            .map_err(authority_error)?
            .ok_or_else(|| invalid("after_event_id", "unknown event id"))?
    };
    let (sender, receiver) = tokio::sync::mpsc::channel(WATCH_BUFFER);
    let mut wake = lifecycle.subscribe();
    tokio::spawn(async move {
        loop {
            let page = match lifecycle
                .events_after(position, account.clone(), LIST_SIZE_MAX)
                .await
            {
                Ok(page) => page,
                Err(error) => {
                    let _ = sender.send(Err(authority_error(error))).await;
                    return;
                }
            };
            for (seq, event) in &page {
                position = *seq;
                let wanted = kinds.is_empty() || kinds.contains(&event.kind);
                if wanted && sender.send(Ok(event_to_pb(event))).await.is_err() {
                    return;
                }
            }
            if page.is_empty() {
                let _ =
                    tokio::time::timeout(Duration::from_millis(WATCH_POLL_MS), wake.recv()).await;
                if sender.is_closed() {
                    return;
                }
            }
        }
    });
    Ok(Box::pin(tokio_stream::wrappers::ReceiverStream::new(
        receiver,
    )))
}

/// Accounts per ranking by default and at most.
pub const RANK_LIMIT_DEFAULT: u32 = 20;
pub const RANK_LIMIT_MAX: u32 = 1_000;
/// The window a ranking covers when the request leaves `from` unset.
pub const RANK_WINDOW_DEFAULT_MS: i64 = 7 * 24 * 3_600_000;

pub async fn rank_accounts(
    lifecycle: &dyn Lifecycle,
    request: pb::RankAccountsRequest,
    now: Timestamp,
) -> Result<pb::RankAccountsReply, Status> {
    let until = request
        .until
        .as_ref()
        .map(|t| decode::timestamp("until", t))
        .transpose()?
        .unwrap_or(now);
    let from = match request.from.as_ref() {
        Some(t) => decode::timestamp("from", t)?,
        None => Timestamp::from_millis(until.millis().saturating_sub(RANK_WINDOW_DEFAULT_MS))
            .unwrap_or(Timestamp::EPOCH),
    };
    if until <= from {
        return Err(invalid("until", "must be after from"));
    }
    let limit = match request.limit {
        0 => RANK_LIMIT_DEFAULT,
        limit if limit <= RANK_LIMIT_MAX => limit,
        limit => {
            return Err(invalid(
                "limit",
                format!("{limit}, at most {RANK_LIMIT_MAX} allowed"),
            ))
        }
    };
    let (by_burn, by_growth) = lifecycle
        .burn_ranking(from, until, limit as usize)
        .await
        .map_err(authority_error)?;
    let rank = |r: &BurnRank| pb::AccountRank {
        account_id: r.account.to_string(),
        burned: r.burned.to_string(),
        first_half: r.first_half.to_string(),
        second_half: r.second_half.to_string(),
        growth_percent: r
            .growth_percent
            .map(|g| g.round_dp(2).normalize().to_string())
            .unwrap_or_default(),
    };
    Ok(pb::RankAccountsReply {
        by_burn: by_burn.iter().map(rank).collect(),
        by_growth: by_growth.iter().map(rank).collect(),
    })
}
