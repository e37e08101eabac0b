//! The Admin calls for plans and contracts: decoded (every problem named at once), handed to
//! `tollgate-authority`, encoded.

use std::collections::BTreeMap;

use rust_decimal::Decimal;
use tollgate_authority::plans::{Plan, PlanChange, PlanChangeReport, PlanGrant, Proration};
use tollgate_core::{AccountId, Contract, PlanId, Rate, Scope};
use tollgate_proto::{decode, pb};
use tonic::Status;

use crate::lifecycle::{period_unit_from_pb, period_unit_to_pb, refuse_all, Problems};

/// Longest plan description, in bytes.
pub const PLAN_DESCRIPTION_LEN_MAX: usize = 512;

pub fn plan_from_pb(plan: Option<pb::Plan>) -> Result<Plan, Status> {
    let plan = plan.ok_or_else(|| Status::from(decode_invalid("plan", "must be set")))?;
    let mut problems = Problems::new();
    let id = match decode::id::<PlanId>("plan.plan_id", &plan.plan_id) {
        Ok(id) => Some(id),
        Err(error) => {
            problems.push(("plan.plan_id".into(), error.message));
            None
        }
    };
    if plan.description.len() > PLAN_DESCRIPTION_LEN_MAX {
        problems.push((
            "plan.description".into(),
            format!("at most {PLAN_DESCRIPTION_LEN_MAX} bytes"),
        ));
    }
    let mut grants = Vec::new();
    for (n, grant) in plan.grants.iter().enumerate() {
        let field = |name: &str| format!("plan.grants[{n}].{name}");
        let amount = decode::positive_credits(&field("amount"), &grant.amount)
            .map_err(|e| problems.push((field("amount"), e.message)))
            .ok();
        let unit = period_unit_from_pb(grant.period_unit)
            .map_err(|e| problems.push((field("period_unit"), e)))
            .ok();
        let count = grant.period_count.max(1);
        let period = unit.and_then(|unit| {
            tollgate_core::Recurrence::new(tollgate_core::Timestamp::EPOCH, unit, count)
                .map_err(|e| problems.push((field("period_count"), e.to_string())))
                .ok()
                .map(|r| r.period)
        });
        let rollover = crate::lifecycle::rollover_from_pb(grant.rollover.as_ref())
            .map_err(|e| problems.push((field("rollover"), e.message().to_owned())))
            .ok();
        let scope = decode::scope(&field("scope"), grant.scope.as_ref())
            .map_err(|e| problems.push((field("scope"), e.message)))
            .ok();
        if let (Some(amount), Some(period), Some(rollover), Some(scope)) =
            (amount, period, rollover, scope)
        {
            grants.push(PlanGrant {
                key: grant.key.clone(),
                amount,
                period,
                rollover,
                priority: grant.priority,
                scope,
            });
        }
    }
    let Some(id) = id else {
        // The id's problem is among them, so this always refuses.
        refuse_all(problems)?;
        return Err(decode_invalid("plan.plan_id", "must be set").into());
    };
    let plan = Plan {
        id,
        description: plan.description,
        tier: plan.tier,
        grants,
    };
    problems.extend(plan.problems());
    refuse_all(problems)?;
    Ok(plan)
}

fn decode_invalid(field: &str, message: &str) -> tollgate_proto::ServiceError {
    tollgate_proto::ServiceError::invalid(field, message)
}

pub fn plan_to_pb(plan: &Plan) -> pb::Plan {
    pb::Plan {
        plan_id: plan.id.to_string(),
        description: plan.description.clone(),
        tier: plan.tier,
        grants: plan
            .grants
            .iter()
            .map(|g| pb::PlanGrant {
                key: g.key.clone(),
                amount: g.amount.to_string(),
                period_unit: period_unit_to_pb(g.period.unit).into(),
                period_count: g.period.count,
                rollover: Some(crate::lifecycle::rollover_to_pb(&g.rollover)),
                priority: g.priority,
                scope: Some(pb::Scope {
                    features: match &g.scope {
                        Scope::All => Vec::new(),
                        Scope::Features(f) => f.iter().map(ToString::to_string).collect(),
                    },
                }),
            })
            .collect(),
    }
}

pub fn plan_change_from_pb(
    request: &pb::ChangePlanRequest,
) -> Result<(AccountId, PlanChange), Status> {
    let key = decode::idempotency_key(&request.idempotency_key)?;
    let account = decode::id("account_id", &request.account_id)?;
    let plan = decode::optional_id("plan_id", &request.plan_id)?;
    let proration = match pb::Proration::try_from(request.proration) {
        Ok(pb::Proration::Unspecified | pb::Proration::NextPeriod) => Proration::NextPeriod,
        Ok(pb::Proration::ProratedNow) => Proration::ProratedNow,
        Err(_) => {
            return Err(decode_invalid("proration", "unknown value").into());
        }
    };
    let grace_ms = i64::try_from(request.reinstate_grace_seconds)
        .ok()
        .and_then(|s| s.checked_mul(1_000))
        .filter(|ms| *ms <= tollgate_authority::plans::REINSTATE_GRACE_MS_MAX)
        .ok_or_else(|| {
            Status::from(decode_invalid("reinstate_grace_seconds", "at most 90 days"))
        })?;
    Ok((
        account,
        PlanChange {
            key: key.to_string(),
            plan,
            proration,
            reinstate_grace_ms: grace_ms,
        },
    ))
}

pub fn plan_change_to_pb(report: &PlanChangeReport) -> pb::ChangePlanReply {
    pb::ChangePlanReply {
        previous_plan_id: report
            .previous
            .as_ref()
            .map(ToString::to_string)
            .unwrap_or_default(),
        upgrade: report.upgrade,
        schedule_ids: report.schedules.clone(),
        granted: report
            .granted
            .iter()
            .map(|(id, amount)| pb::GrantedNow {
                grant_id: id.to_string(),
                amount: amount.to_string(),
            })
            .collect(),
        starts_at: report.starts_at.map(decode::timestamp_to_pb),
    }
}

/// Decodes every contract of a SetContracts request; every problem is named at once.
pub fn contracts_from_pb(
    account: &AccountId,
    contracts: &[pb::Contract],
) -> Result<Vec<Contract>, Status> {
    let mut problems = Problems::new();
    let mut decoded = Vec::new();
    for (n, contract) in contracts.iter().enumerate() {
        let field = |name: &str| format!("contracts[{n}].{name}");
        let from = match contract.effective_from.as_ref() {
            None => {
                problems.push((field("effective_from"), "must be set".into()));
                None
            }
            Some(at) => decode::timestamp(&field("effective_from"), at)
                .map_err(|e| problems.push((field("effective_from"), e.message)))
                .ok(),
        };
        let until = contract.effective_until.as_ref().and_then(|at| {
            decode::timestamp(&field("effective_until"), at)
                .map_err(|e| problems.push((field("effective_until"), e.message)))
                .ok()
        });
        let mut rates = BTreeMap::new();
        for (feature, rate) in &contract.rates {
            let name = format!("contracts[{n}].rates[{feature}]");
            match (decode::id(&name, feature), Rate::parse(rate)) {
                (Ok(feature), Ok(rate)) => {
                    rates.insert(feature, rate);
                }
                (Err(error), _) => problems.push((name, error.message)),
                (_, Err(error)) => problems.push((name, error.to_string())),
            }
        }
        let discount = if contract.discount_multiplier.is_empty() {
            None
        } else {
            contract
                .discount_multiplier
                .parse::<Decimal>()
                .map_err(|e| problems.push((field("discount_multiplier"), e.to_string())))
                .ok()
        };
        if let Some(from) = from {
            decoded.push(Contract {
                account_id: account.clone(),
                rates,
                locked_version: contract.locked_version,
                discount_multiplier: discount,
                effective_from: from,
                effective_until: until,
                no_expiry: contract.no_expiry,
            });
        }
    }
    refuse_all(problems)?;
    Ok(decoded)
}

pub fn contract_to_pb(contract: &Contract) -> pb::Contract {
    pb::Contract {
        effective_from: Some(decode::timestamp_to_pb(contract.effective_from)),
        effective_until: contract.effective_until.map(decode::timestamp_to_pb),
        rates: contract
            .rates
            .iter()
            .map(|(f, r)| (f.to_string(), r.as_decimal().normalize().to_string()))
            .collect(),
        locked_version: contract.locked_version,
        discount_multiplier: contract
            .discount_multiplier
            .map(|d| d.normalize().to_string())
            .unwrap_or_default(),
        no_expiry: contract.no_expiry,
    }
}
