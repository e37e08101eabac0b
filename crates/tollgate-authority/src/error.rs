//! What can go wrong in the authority: faults of the stores it drives, and bad input.

use thiserror::Error;
use tollgate_ledger::LedgerError;
use tollgate_region::RegionError;

#[derive(Debug, Error)]
pub enum AuthorityError {
    #[error("ledger: {0}")]
    Ledger(#[from] LedgerError),
    #[error("region {region}: {error}")]
    Region { region: String, error: RegionError },
    #[error("authority state: {0}")]
    State(#[from] sqlx::Error),
    #[error("{field}: {message}")]
    InvalidArgument {
        field: &'static str,
        message: String,
    },
    #[error("{0} does not exist")]
    NotFound(String),
    #[error("{0} already exists with different content")]
    Conflict(String),
    #[error("stored authority state is unreadable: {0}")]
    Corrupt(String),
    /// Cannot be done now, for a reason that passes (a region not answering, credits on their
    /// way back): retry later. The message says why.
    #[error("{0}")]
    Busy(String),
    /// Cannot be done until someone acts (the message says what); retrying alone will not do.
    #[error("{0}")]
    Precondition(String),
}

impl AuthorityError {
    pub(crate) fn invalid(field: &'static str, message: impl ToString) -> Self {
        AuthorityError::InvalidArgument {
            field,
            message: message.to_string(),
        }
    }

    pub(crate) fn corrupt(what: impl std::fmt::Display) -> Self {
        AuthorityError::Corrupt(what.to_string())
    }

    pub(crate) fn region(region: &tollgate_core::RegionId, error: RegionError) -> Self {
        AuthorityError::Region {
            region: region.to_string(),
            error,
        }
    }
}

pub type Result<T, E = AuthorityError> = std::result::Result<T, E>;
