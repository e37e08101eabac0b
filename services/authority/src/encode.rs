//! Ledger results into wire messages, and ledger errors into the error table's codes.

use tollgate_ledger::{
    AccountSnapshot, Entry, GrantRecord, LedgerError, Outcome, ProblemKind, Refusal, RefusalCode,
    VerifyReport,
};
use tollgate_proto::decode::{entry_kind_to_pb, grant_to_pb, price_rule_to_pb, timestamp_to_pb};
use tollgate_proto::{pb, ErrorCode, ServiceError};

use crate::balance::{AccountBalance, GrantAside};

pub fn ledger_error(error: LedgerError) -> tonic::Status {
    ledger_error_ref(&error)
}

pub fn ledger_error_ref(error: &LedgerError) -> tonic::Status {
    let code = match error {
        LedgerError::UnknownAccount(_)
        | LedgerError::UnknownGrant { .. }
        | LedgerError::UnknownDebit { .. } => ErrorCode::NotFound,
        LedgerError::AccountExists(_) => ErrorCode::AlreadyExists,
        LedgerError::IdempotencyConflict { .. } => ErrorCode::IdempotencyConflict,
        LedgerError::InvalidArgument { .. } => ErrorCode::InvalidArgument,
        LedgerError::Database(sqlx_error) if is_unavailable(sqlx_error) => ErrorCode::Unavailable,
        LedgerError::Database(_) | LedgerError::Corrupt(_) | LedgerError::Migrate(_) => {
            ErrorCode::Internal
        }
    };
    if matches!(code, ErrorCode::Internal | ErrorCode::Unavailable) {
        tracing::error!(error = %error, "ledger call failed");
        let message = match code {
            ErrorCode::Unavailable => "ledger unavailable, retry",
            _ => "internal error",
        };
        return ServiceError::new(code, message).into();
    }
    ServiceError::new(code, error.to_string()).into()
}

fn is_unavailable(error: &sqlx::Error) -> bool {
    matches!(
        error,
        sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed
    )
}

pub fn refusal(refusal: &Refusal) -> pb::Refusal {
    let code = match refusal.code {
        RefusalCode::RefundExceedsDebit => pb::RefusalCode::RefundExceedsDebit,
        RefusalCode::GrantClosed => pb::RefusalCode::GrantClosed,
        RefusalCode::GrantNotYetExpired => pb::RefusalCode::GrantNotYetExpired,
        RefusalCode::DuplicateGrant => pb::RefusalCode::DuplicateGrant,
        RefusalCode::DrawExceedsGrant => pb::RefusalCode::DrawExceedsGrant,
        RefusalCode::OverdraftExceeded => pb::RefusalCode::OverdraftExceeded,
        RefusalCode::AmountOverflow => pb::RefusalCode::AmountOverflow,
        RefusalCode::UnknownAccount => pb::RefusalCode::UnknownAccount,
        RefusalCode::UnknownGrant => pb::RefusalCode::UnknownGrant,
    };
    pb::Refusal {
        code: code.into(),
        message: refusal.message.clone(),
        ..Default::default()
    }
}

pub fn mutation(outcome: Outcome) -> pb::MutationReply {
    let outcome = match outcome {
        Ok(receipt) => pb::mutation_reply::Outcome::Done(pb::Receipt {
            account_id: receipt.account.to_string(),
            movements: receipt.movements.iter().map(Into::into).collect(),
            first_seq: receipt.first_seq,
            last_seq: receipt.last_seq,
            balance_after: receipt.balance.to_string(),
            grant_id: receipt.grant_id.map(|g| g.to_string()).unwrap_or_default(),
            recorded_at: Some(timestamp_to_pb(receipt.recorded_at)),
            replayed: receipt.replayed,
        }),
        Err(refused) => pb::mutation_reply::Outcome::Refused(refusal(&refused)),
    };
    pb::MutationReply {
        outcome: Some(outcome),
    }
}

pub fn balance(snapshot: &AccountSnapshot) -> pb::Balance {
    pb::Balance {
        account_id: snapshot.account.to_string(),
        balance: snapshot.balance.to_string(),
        debt: snapshot.debt.to_string(),
        overdraft_limit: snapshot.overdraft_limit.to_string(),
        totals: Some((&snapshot.totals).into()),
        entry_count: snapshot.entry_count,
        as_of: Some(timestamp_to_pb(snapshot.updated_at)),
    }
}

/// Admin `GetBalance`'s reply: the account's balance as `told` (in `balance.balance`), with the
/// terms it is made of and the ledger's own sum and totals from `snapshot`.
pub fn balance_reply(
    snapshot: &AccountSnapshot,
    told: &AccountBalance,
) -> pb::AdminGetBalanceReply {
    let asides = |grants: &[GrantAside]| {
        grants
            .iter()
            .map(|aside| pb::GrantAside {
                grant_id: aside.grant.to_string(),
                remaining: aside.remaining.to_string(),
                at: Some(timestamp_to_pb(aside.at)),
            })
            .collect()
    };
    pb::AdminGetBalanceReply {
        balance: Some(pb::Balance {
            balance: told.balance.to_string(),
            ..balance(snapshot)
        }),
        ledger_balance: snapshot.balance.to_string(),
        effective: told.effective.to_string(),
        held: told.held.to_string(),
        upcoming: asides(&told.upcoming),
        lapsed: asides(&told.lapsed),
        holds_unread: told.holds_unread.clone(),
    }
}

pub fn account(snapshot: &AccountSnapshot) -> pb::Account {
    pb::Account {
        account_id: snapshot.account.to_string(),
        overdraft_limit: snapshot.overdraft_limit.to_string(),
        balance: Some(balance(snapshot)),
        metadata: snapshot.metadata.entries().clone().into_iter().collect(),
        created_at: Some(timestamp_to_pb(snapshot.created_at)),
        last_hash: snapshot.last_hash.clone(),
        settings: None,
    }
}

pub fn grant(record: &GrantRecord) -> pb::Grant {
    pb::Grant {
        metadata: record.metadata.entries().clone().into_iter().collect(),
        created_at: Some(timestamp_to_pb(record.created_at)),
        ..grant_to_pb(&record.account, &record.grant)
    }
}

pub fn entry(entry: &Entry) -> pb::Entry {
    let text = |value: Option<String>| value.unwrap_or_default();
    pb::Entry {
        account_id: entry.account.to_string(),
        seq: entry.seq,
        kind: entry_kind_to_pb(entry.kind).into(),
        amount: entry.amount.to_string(),
        grant_id: text(entry.grant_id.as_ref().map(ToString::to_string)),
        debit_id: text(entry.debit_id.as_ref().map(ToString::to_string)),
        operation: entry.operation.clone(),
        feature: text(entry.feature.as_ref().map(ToString::to_string)),
        actor_id: text(entry.actor.as_ref().map(ToString::to_string)),
        region: text(entry.region.as_ref().map(ToString::to_string)),
        price_version: entry.price_version.unwrap_or(0),
        price_rule: entry
            .price_rule
            .map(|rule| price_rule_to_pb(rule).into())
            .unwrap_or_default(),
        memo: entry.memo.clone(),
        event_time: Some(timestamp_to_pb(entry.event_at)),
        recorded_at: Some(timestamp_to_pb(entry.recorded_at)),
        prev_hash: entry.prev_hash.clone(),
        hash: entry.hash.clone(),
        quantity: text(entry.quantity.map(|q| q.to_string())),
        unit: text(entry.unit.clone()),
        rate: text(entry.rate.map(|r| r.to_string())),
    }
}

pub fn verify(report: &VerifyReport) -> pb::VerifyReply {
    let problems = report
        .problems
        .iter()
        .map(|problem| {
            let kind = match problem.kind {
                ProblemKind::HashMismatch => pb::ProblemKind::HashMismatch,
                ProblemKind::ChainBroken => pb::ProblemKind::ChainBroken,
                ProblemKind::SequenceGap => pb::ProblemKind::SequenceGap,
                ProblemKind::UnreadableEntry => pb::ProblemKind::UnreadableEntry,
                ProblemKind::TotalsMismatch => pb::ProblemKind::TotalsMismatch,
                ProblemKind::BalanceEquation => pb::ProblemKind::BalanceEquation,
                ProblemKind::BalanceMismatch => pb::ProblemKind::BalanceMismatch,
                ProblemKind::GrantOutOfRange => pb::ProblemKind::GrantOutOfRange,
                ProblemKind::GrantMismatch => pb::ProblemKind::GrantMismatch,
                ProblemKind::DebtMismatch => pb::ProblemKind::DebtMismatch,
                ProblemKind::ChainHeadMismatch => pb::ProblemKind::ChainHeadMismatch,
            };
            pb::Problem {
                account_id: problem.account.to_string(),
                seq: problem.seq.unwrap_or(0),
                grant_id: problem
                    .grant
                    .as_ref()
                    .map(ToString::to_string)
                    .unwrap_or_default(),
                kind: kind.into(),
                detail: problem.detail.clone(),
            }
        })
        .collect();
    pb::VerifyReply {
        ok: report.is_clean(),
        accounts_checked: report.accounts_checked,
        entries_checked: report.entries_checked,
        problems,
        truncated: report.truncated,
    }
}
