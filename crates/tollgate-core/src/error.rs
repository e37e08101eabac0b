//! The typed errors of the rules. Services map them to wire codes in one table.

use thiserror::Error;

use crate::credits::Credits;
use crate::grant::GrantSource;
use crate::ids::GrantId;
use crate::time::Timestamp;

#[derive(Clone, Copy, Debug, Error, PartialEq, Eq)]
pub enum AmountError {
    #[error("not a plain decimal number")]
    Malformed,
    #[error("{scale} decimals, at most {scale_max} allowed")]
    TooPrecise { scale: u32, scale_max: u32 },
    #[error("out of range")]
    Overflow,
    #[error("must not be negative")]
    Negative,
    #[error("must be more than zero")]
    Zero,
}

#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum IdError {
    #[error("must not be empty")]
    Empty,
    #[error("{len} bytes, at most {len_max} allowed")]
    TooLong { len: usize, len_max: usize },
    #[error("character {character:?} at byte {index} is not allowed")]
    BadCharacter { character: char, index: usize },
}

#[derive(Clone, Copy, Debug, Error, PartialEq, Eq)]
pub enum TimeError {
    #[error("not an RFC 3339 timestamp")]
    Malformed,
    #[error("outside 1970-01-01 to 9999-12-31")]
    OutOfRange,
}

/// A grant whose fields contradict each other.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum GrantError {
    #[error("amount must be more than zero")]
    AmountNotPositive,
    #[error("remaining {remaining} is outside 0..={amount}")]
    RemainingOutOfRange { remaining: Credits, amount: Credits },
    #[error("expires_at {expires_at} is not after effective_at {effective_at}")]
    ExpiresBeforeEffective {
        effective_at: Timestamp,
        expires_at: Timestamp,
    },
    #[error("scope names no feature")]
    EmptyScope,
    #[error("{0}")]
    Amount(#[from] AmountError),
}

/// A movement that the account's state cannot take.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum BookError {
    #[error("grant {0} already exists")]
    DuplicateGrant(GrantId),
    #[error("grant {0} does not exist")]
    UnknownGrant(GrantId),
    #[error("grant {0} is closed")]
    GrantClosed(GrantId),
    #[error("grant {grant} does not expire until {expires_at:?}")]
    NotYetExpired {
        grant: GrantId,
        expires_at: Option<Timestamp>,
    },
    #[error("debit already recorded")]
    DuplicateDebit,
    #[error("hold already exists")]
    DuplicateHold,
    #[error("hold does not exist")]
    UnknownHold,
    #[error("grants from {0:?} come from their own operation")]
    SourceNotAllowed(GrantSource),
    #[error("debit does not exist")]
    UnknownDebit,
    #[error("refund of {requested} exceeds the {refundable} still refundable")]
    RefundExceedsDebit {
        requested: Credits,
        refundable: Credits,
    },
    #[error("draw of {requested} from grant {grant} exceeds its available {available}")]
    DrawExceedsGrant {
        grant: GrantId,
        requested: Credits,
        available: Credits,
    },
    #[error("overdraft of {requested} exceeds the {room} left under the limit")]
    OverdraftExceeded { requested: Credits, room: Credits },
    #[error("{0}")]
    Grant(#[from] GrantError),
    #[error("{0}")]
    Amount(#[from] AmountError),
}
