//! Resolving parked usage: what a region served that the ledger could not take (see the
//! reconciler's `park`), charged to the ledger now or written off by an operator.
//!
//! A CHARGE is one usage debit through [`LedgerStore::apply_usage`], the operation the
//! reconciler itself uses, so the entry is a `debit` like any other, under the record's own
//! debit id (a later reversal from its region finds it): first with the record's own draws
//! and event time (they may apply now, e.g. after a grant was reinstated), else with draws
//! planned now by the core's burn-down (`plan_burn`) against the account's current grants,
//! within its overdraft limit and never beyond it. The planned debit is stored with the
//! claim before it is applied, so a retry under the same key applies the very same debit
//! (the ledger answers it as a duplicate) and nothing is charged twice.

use tollgate_core::command::UsageDebit;
use tollgate_core::{
    plan_burn, ActorId, BurnPlan, BurnRequest, Credits, FeatureKey, HoldId, IdempotencyKey,
    PriceRule, RegionId, Reserved, Timestamp,
};
use tollgate_ledger::{LedgerError, LedgerStore, UsageOutcome, OPEN_GRANTS_MAX};

use crate::error::{AuthorityError, Result};
use crate::state::{ParkedResolution, ParkedRow, ParkedState, StateStore};

/// What an operator does with a parked record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParkedAction {
    Charge,
    WriteOff,
}

impl ParkedAction {
    /// The resolution a record carries once done.
    pub fn resolution(self) -> &'static str {
        match self {
            ParkedAction::Charge => "charged",
            ParkedAction::WriteOff => "written_off",
        }
    }
}

/// `ResolveParkedUsage`, decoded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResolveParked {
    pub key: IdempotencyKey,
    pub id: i64,
    pub action: ParkedAction,
    /// Required for a write-off (checked when decoding).
    pub reason: String,
    /// Who resolves it: the API key's name.
    pub by: String,
}

/// The record as resolved, and whether this was a replay.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParkedResolved {
    pub record: ParkedRow,
    pub replayed: bool,
}

/// Resolves a parked record (see the module's comment). Idempotent by key: the same key for
/// the same action answers the record as resolved, `replayed`.
pub async fn resolve(
    ledger: &dyn LedgerStore,
    state: &StateStore,
    command: &ResolveParked,
    now: Timestamp,
) -> Result<ParkedResolved> {
    let row = load(state, command.id).await?;
    if let Some(answer) = settled(&row, command)? {
        return Ok(answer);
    }
    let resolution = match command.action {
        ParkedAction::WriteOff => ParkedResolution {
            resolution: command.action.resolution().to_owned(),
            by: command.by.clone(),
            reason: command.reason.clone(),
            at: now,
            debit_id: String::new(),
            charged: Credits::ZERO,
        },
        ParkedAction::Charge => charge(ledger, state, &row, command, now).await?,
    };
    let key = command.key.as_str();
    let done = state.resolve_parked(command.id, key, &resolution).await?;
    let row = load(state, command.id).await?;
    if done {
        return Ok(ParkedResolved {
            record: row,
            replayed: false,
        });
    }
    // Someone resolved it between the read and the write.
    settled(&row, command)?.ok_or_else(|| busy(command.id))
}

async fn load(state: &StateStore, id: i64) -> Result<ParkedRow> {
    state
        .parked(id)
        .await?
        .ok_or_else(|| AuthorityError::NotFound(format!("parked usage {id}")))
}

fn busy(id: i64) -> AuthorityError {
    AuthorityError::Precondition(format!(
        "parked usage {id} is being resolved under another idempotency key"
    ))
}

/// The answer when the record is resolved or held already: a replay, a conflict or a refusal;
/// `None` when this call may go on.
fn settled(row: &ParkedRow, command: &ResolveParked) -> Result<Option<ParkedResolved>> {
    let same_key = row.resolution_key == command.key.as_str();
    match (&row.resolution, row.state) {
        (Some(done), ParkedState::Resolved) if same_key => {
            if done.resolution == command.action.resolution() {
                Ok(Some(ParkedResolved {
                    record: row.clone(),
                    replayed: true,
                }))
            } else {
                Err(AuthorityError::Conflict(format!(
                    "idempotency key {} (used to resolve parked usage {} as {})",
                    command.key, row.id, done.resolution
                )))
            }
        }
        (Some(done), _) => Err(AuthorityError::Precondition(format!(
            "parked usage {} is already resolved: {} by {} at {}",
            row.id, done.resolution, done.by, done.at
        ))),
        (None, ParkedState::Charging) if !same_key => Err(busy(row.id)),
        (None, ParkedState::Charging) if command.action != ParkedAction::Charge => {
            Err(AuthorityError::Conflict(format!(
                "idempotency key {} (used to charge parked usage {})",
                command.key, row.id
            )))
        }
        _ => Ok(None),
    }
}

/// Charges the record to the ledger; the resolution to write.
async fn charge(
    ledger: &dyn LedgerStore,
    state: &StateStore,
    row: &ParkedRow,
    command: &ResolveParked,
    now: Timestamp,
) -> Result<ParkedResolution> {
    let key = command.key.as_str();
    let done = |debit_id: String, debit: &UsageDebit| ParkedResolution {
        resolution: command.action.resolution().to_owned(),
        by: command.by.clone(),
        reason: command.reason.clone(),
        at: now,
        debit_id,
        charged: debit.amount(),
    };
    // A CHARGE in flight under this key: apply exactly what it planned.
    if row.state == ParkedState::Charging && !row.charge.is_empty() {
        let debit: UsageDebit =
            serde_json::from_str(&row.charge).map_err(AuthorityError::corrupt)?;
        return match apply(ledger, &debit, now).await? {
            Ok(debit_id) => Ok(done(debit_id, &debit)),
            Err(refused) => Err(refuse(state, row, key, refused).await?),
        };
    }
    let own = own_debit(state, row).await?;
    claim(state, row, key, &own).await?;
    let first_refusal = match apply(ledger, &own, now).await? {
        Ok(debit_id) => return Ok(done(debit_id, &own)),
        Err(refused) => refused,
    };
    let planned = match planned_debit(ledger, row, &own, now).await {
        Ok(Ok(planned)) => planned,
        Ok(Err(why)) => {
            let why = format!("its own draws were refused ({first_refusal}), and {why}");
            return Err(refuse(state, row, key, why).await?);
        }
        Err(error) => {
            state.release_parked_charge(row.id, key).await?;
            return Err(error);
        }
    };
    claim(state, row, key, &planned).await?;
    match apply(ledger, &planned, now).await? {
        Ok(debit_id) => Ok(done(debit_id, &planned)),
        Err(refused) => Err(refuse(state, row, key, refused).await?),
    }
}

async fn claim(state: &StateStore, row: &ParkedRow, key: &str, debit: &UsageDebit) -> Result<()> {
    let json = serde_json::to_string(debit).map_err(AuthorityError::corrupt)?;
    if state.claim_parked_charge(row.id, key, &json).await? {
        Ok(())
    } else {
        Err(busy(row.id))
    }
}

/// Gives the claim back and says why nothing was charged.
async fn refuse(
    state: &StateStore,
    row: &ParkedRow,
    key: &str,
    why: String,
) -> Result<AuthorityError> {
    state.release_parked_charge(row.id, key).await?;
    Ok(AuthorityError::Precondition(format!(
        "parked usage {} cannot be charged: {why}",
        row.id
    )))
}

/// Applies one debit: the ledger's debit id, or why it was refused.
async fn apply(
    ledger: &dyn LedgerStore,
    debit: &UsageDebit,
    now: Timestamp,
) -> Result<std::result::Result<String, String>> {
    let outcomes = ledger.apply_usage(vec![debit.clone()], now).await?;
    match outcomes.into_iter().next() {
        Some(UsageOutcome::Applied { debit_id, .. } | UsageOutcome::Duplicate { debit_id }) => {
            Ok(Ok(debit_id.to_string()))
        }
        Some(UsageOutcome::Refused { refusal, .. }) => Ok(Err(refusal.message)),
        None => Err(AuthorityError::corrupt("the ledger answered no outcome")),
    }
}

/// The record as its region decided it: its draws, overdraft, event time and price (the unit
/// is the feature's as named now: the record keeps the quantity and rate, not the unit's name).
async fn own_debit(state: &StateStore, row: &ParkedRow) -> Result<UsageDebit> {
    let parked = &row.parked;
    let why = |what: &str| {
        AuthorityError::Precondition(format!(
            "parked usage {} cannot be charged: {what}; write it off instead",
            row.id
        ))
    };
    match parked.kind.as_str() {
        "debit" | "capture" => {}
        "reverse" => {
            return Err(why(
                "it is a reversal (credits to give back, not to take); refund its debit with \
                 Refund if it is in the ledger",
            ))
        }
        _ => return Err(why("its parts could not be read back from its description")),
    }
    let feature = FeatureKey::new(parked.feature.clone())
        .map_err(|_| why("its feature could not be read back"))?;
    let unit = match parked.quantity {
        Some(_) => state.feature_units(&[&feature]).await?.remove(&feature),
        None => None,
    };
    let region = RegionId::new(parked.region.clone()).map_err(AuthorityError::corrupt)?;
    let key = IdempotencyKey::new(parked.key.clone()).map_err(AuthorityError::corrupt)?;
    let actor = match parked.actor.as_str() {
        "" => None,
        actor => Some(ActorId::new(actor.to_owned()).map_err(AuthorityError::corrupt)?),
    };
    let hold = match parked.hold_id.as_str() {
        "" => None,
        hold => Some(HoldId::new(hold.to_owned()).map_err(AuthorityError::corrupt)?),
    };
    Ok(UsageDebit {
        debit_id: crate::reconciler::debit_id(&region, &key)?,
        idempotency_key: Some(key),
        account: row.account()?,
        feature,
        at: parked.at,
        plan: BurnPlan {
            draws: parked.draws.clone(),
            overdraft: parked.overdraft,
        },
        price_version: parked.price_version,
        // A record parked from its description alone has no price tag: the default rule.
        price_rule: parked.price_rule.unwrap_or(PriceRule::Default),
        quantity: parked.quantity,
        rate: parked.rate,
        unit,
        actor,
        region: Some(region),
        hold,
    })
}

/// The record's cost as a debit planned now against the account's current grants, or why
/// the account cannot pay it.
async fn planned_debit(
    ledger: &dyn LedgerStore,
    row: &ParkedRow,
    own: &UsageDebit,
    now: Timestamp,
) -> Result<std::result::Result<UsageDebit, String>> {
    let snapshot = match ledger.account(&own.account).await {
        Ok(snapshot) => snapshot,
        Err(LedgerError::UnknownAccount(_)) => {
            return Ok(Err(format!("account {} does not exist", own.account)))
        }
        Err(other) => return Err(other.into()),
    };
    let grants = ledger
        .grants_with_credits(&own.account, OPEN_GRANTS_MAX)
        .await?;
    let request = BurnRequest {
        feature: &own.feature,
        at: now,
        cost: row.parked.cost,
        overdraft_limit: snapshot.overdraft_limit,
        debt: snapshot.debt,
    };
    match plan_burn(&grants, &Reserved::default(), &request) {
        Ok(plan) => Ok(Ok(UsageDebit {
            at: now,
            plan,
            ..own.clone()
        })),
        Err(short) => Ok(Err(format!(
            "the account cannot pay {} now: {} available within its overdraft limit, {} short \
             (issue a grant or raise the overdraft limit, or write it off)",
            short.cost, short.available, short.shortfall
        ))),
    }
}
