//! Faults and bad input (`LedgerError`) versus expected refusals (`Refusal`, a typed outcome).

use serde::{Deserialize, Serialize};
use thiserror::Error;
use tollgate_core::{AccountId, BookError, DebitId, GrantId};

/// Something the caller or the machine got wrong; nothing was written.
#[derive(Debug, Error)]
pub enum LedgerError {
    #[error("account {0} does not exist")]
    UnknownAccount(AccountId),
    #[error("grant {grant} of account {account} does not exist")]
    UnknownGrant { account: AccountId, grant: GrantId },
    #[error("debit {debit} of account {account} does not exist")]
    UnknownDebit { account: AccountId, debit: DebitId },
    #[error("account {0} already exists")]
    AccountExists(AccountId),
    #[error(
        "idempotency key {key:?} was already used for a different request \
         ({operation} on account {account})"
    )]
    IdempotencyConflict {
        key: String,
        operation: String,
        account: String,
    },
    #[error("{field}: {message}")]
    InvalidArgument {
        field: &'static str,
        message: String,
    },
    #[error("stored data is inconsistent: {0}")]
    Corrupt(String),
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("migrations: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
}

impl LedgerError {
    pub(crate) fn invalid(field: &'static str, message: impl ToString) -> Self {
        LedgerError::InvalidArgument {
            field,
            message: message.to_string(),
        }
    }

    pub(crate) fn corrupt(what: impl std::fmt::Display) -> Self {
        LedgerError::Corrupt(what.to_string())
    }
}

/// Why the ledger refused a mutation. Expected, typed, and carried in replies (not an error).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RefusalCode {
    /// A refund larger than what remains refundable of its debit.
    RefundExceedsDebit,
    /// The grant is already expired or voided.
    GrantClosed,
    /// Expiring a grant before its `expires_at`.
    GrantNotYetExpired,
    /// A grant with this id already exists on the account.
    DuplicateGrant,
    /// A debit draws more from a grant than it has left, or from a grant not active then.
    DrawExceedsGrant,
    /// A debit's overdraft part exceeds the room under the account's limit.
    OverdraftExceeded,
    /// The result would not fit the amount range.
    AmountOverflow,
    /// A usage debit names an account the ledger does not know.
    UnknownAccount,
    /// A usage debit draws from a grant the ledger does not know.
    UnknownGrant,
}

#[derive(Clone, Debug, PartialEq, Eq, Error, Serialize, Deserialize)]
#[error("{message}")]
pub struct Refusal {
    pub code: RefusalCode,
    pub message: String,
}

impl Refusal {
    pub(crate) fn with_message(code: RefusalCode, message: impl ToString) -> Self {
        Refusal {
            code,
            message: message.to_string(),
        }
    }

    fn new(code: RefusalCode, error: &BookError) -> Self {
        Refusal {
            code,
            message: error.to_string(),
        }
    }
}

/// Splits a rule's error into a refusal (expected) or a ledger error (unknown names, bad input).
pub(crate) fn classify(account: &AccountId, error: BookError) -> Result<Refusal, LedgerError> {
    let code = match &error {
        BookError::RefundExceedsDebit { .. } => RefusalCode::RefundExceedsDebit,
        BookError::GrantClosed(_) => RefusalCode::GrantClosed,
        BookError::NotYetExpired { .. } => RefusalCode::GrantNotYetExpired,
        BookError::DuplicateGrant(_) => RefusalCode::DuplicateGrant,
        BookError::DrawExceedsGrant { .. } => RefusalCode::DrawExceedsGrant,
        BookError::OverdraftExceeded { .. } => RefusalCode::OverdraftExceeded,
        BookError::Amount(_) => RefusalCode::AmountOverflow,
        BookError::UnknownGrant(grant) => {
            return Err(LedgerError::UnknownGrant {
                account: account.clone(),
                grant: grant.clone(),
            })
        }
        BookError::Grant(problem) => return Err(LedgerError::invalid("grant", problem)),
        BookError::SourceNotAllowed(_) => return Err(LedgerError::invalid("source", &error)),
        BookError::UnknownDebit
        | BookError::DuplicateDebit
        | BookError::DuplicateHold
        | BookError::UnknownHold => {
            // The store checks debits itself and keeps no holds, so these mean a bug.
            return Err(LedgerError::corrupt(format!("unexpected refusal: {error}")));
        }
    };
    Ok(Refusal::new(code, &error))
}
