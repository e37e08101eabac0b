//! Ledger entry kinds and the balance equation.
//!
//! For every account at every moment:
//! `granted − debited + refunded − expired − voided + adjusted = balance`, where
//! `balance = Σ grant.remaining − debt`. `rollover` and `settle` entries move credits between
//! grants (or from a grant to the debt) and leave the balance unchanged, so they are not terms.

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::credits::Credits;
use crate::error::AmountError;
use crate::grant::Grant;
use crate::ids::GrantId;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EntryKind {
    /// New credits: purchases, subscriptions, promos, trials, top-ups.
    Grant,
    /// Credits consumed.
    Debit,
    /// Credits given back for a debit (to its grants, or to a new refund grant, or off the debt).
    Refund,
    /// A grant's remainder lost at its expiry.
    Expire,
    /// Part of an ending grant carried into a new rollover grant.
    Rollover,
    /// A grant's remainder cancelled (a refunded purchase).
    Void,
    /// An operator's correction, positive or negative.
    Adjust,
    /// Debt paid off by a grant.
    Settle,
}

impl EntryKind {
    pub const ALL: [EntryKind; 8] = [
        EntryKind::Grant,
        EntryKind::Debit,
        EntryKind::Refund,
        EntryKind::Expire,
        EntryKind::Rollover,
        EntryKind::Void,
        EntryKind::Adjust,
        EntryKind::Settle,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            EntryKind::Grant => "grant",
            EntryKind::Debit => "debit",
            EntryKind::Refund => "refund",
            EntryKind::Expire => "expire",
            EntryKind::Rollover => "rollover",
            EntryKind::Void => "void",
            EntryKind::Adjust => "adjust",
            EntryKind::Settle => "settle",
        }
    }

    pub fn parse(text: &str) -> Option<EntryKind> {
        EntryKind::ALL
            .into_iter()
            .find(|kind| kind.as_str() == text)
    }
}

/// The running sums of an account's entries, by term of the balance equation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Totals {
    pub granted: Credits,
    pub debited: Credits,
    pub refunded: Credits,
    pub expired: Credits,
    pub voided: Credits,
    /// Signed: positive adjustments add, negative ones subtract.
    pub adjusted: Credits,
}

impl Totals {
    /// Adds one entry's amount to its term. `amount` is a magnitude for every kind except
    /// `Adjust`, which is signed. `Rollover` and `Settle` are not terms and change nothing.
    pub fn record(&mut self, kind: EntryKind, amount: Credits) -> Result<(), AmountError> {
        let term = match kind {
            EntryKind::Grant => &mut self.granted,
            EntryKind::Debit => &mut self.debited,
            EntryKind::Refund => &mut self.refunded,
            EntryKind::Expire => &mut self.expired,
            EntryKind::Void => &mut self.voided,
            EntryKind::Adjust => &mut self.adjusted,
            EntryKind::Rollover | EntryKind::Settle => return Ok(()),
        };
        *term = term.checked_add(amount)?;
        Ok(())
    }

    /// The balance the entries say there should be.
    pub fn expected_balance(&self) -> Result<Credits, AmountError> {
        self.granted
            .checked_sub(self.debited)?
            .checked_add(self.refunded)?
            .checked_sub(self.expired)?
            .checked_sub(self.voided)?
            .checked_add(self.adjusted)
    }
}

#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum InvariantViolation {
    #[error("entries say the balance is {expected}, the grants and debt say {actual}")]
    BalanceEquation { expected: Credits, actual: Credits },
    #[error("grant {grant} has remaining {remaining} outside 0..={amount}")]
    GrantRemaining {
        grant: GrantId,
        remaining: Credits,
        amount: Credits,
    },
    #[error("debt {0} is negative")]
    NegativeDebt(Credits),
    #[error("sums overflow")]
    Overflow,
}

/// The balance that grants and debt hold: `Σ remaining − debt`.
pub fn held_balance<'a>(
    grants: impl IntoIterator<Item = &'a Grant>,
    debt: Credits,
) -> Result<Credits, AmountError> {
    Credits::checked_sum(grants.into_iter().map(|grant| grant.remaining))?.checked_sub(debt)
}

/// Checks the balance equation and every grant's `0 <= remaining <= amount`.
pub fn check_invariants<'a>(
    totals: &Totals,
    grants: impl IntoIterator<Item = &'a Grant> + Clone,
    debt: Credits,
) -> Result<(), InvariantViolation> {
    if debt.is_negative() {
        return Err(InvariantViolation::NegativeDebt(debt));
    }
    for grant in grants.clone() {
        if grant.remaining.is_negative() || grant.remaining > grant.amount {
            return Err(InvariantViolation::GrantRemaining {
                grant: grant.id.clone(),
                remaining: grant.remaining,
                amount: grant.amount,
            });
        }
    }
    let expected = totals
        .expected_balance()
        .map_err(|_| InvariantViolation::Overflow)?;
    let actual = held_balance(grants, debt).map_err(|_| InvariantViolation::Overflow)?;
    if expected != actual {
        return Err(InvariantViolation::BalanceEquation { expected, actual });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::grant::GrantSource;
    use crate::time::Timestamp;

    #[test]
    fn kinds_round_trip_their_names() {
        for kind in EntryKind::ALL {
            assert_eq!(EntryKind::parse(kind.as_str()), Some(kind));
        }
        assert_eq!(EntryKind::parse("gift"), None);
    }

    #[test]
    fn equation_detects_a_missing_entry() {
        let mut grant = Grant::new(
            GrantId::new("g").unwrap(),
            Credits::from_whole(10).unwrap(),
            GrantSource::Purchase,
            Timestamp::EPOCH,
        );
        let mut totals = Totals::default();
        totals.record(EntryKind::Grant, grant.amount).unwrap();
        assert_eq!(check_invariants(&totals, [&grant], Credits::ZERO), Ok(()));
        grant.remaining = Credits::from_whole(7).unwrap();
        assert!(matches!(
            check_invariants(&totals, [&grant], Credits::ZERO),
            Err(InvariantViolation::BalanceEquation { .. })
        ));
        totals
            .record(EntryKind::Debit, Credits::from_whole(3).unwrap())
            .unwrap();
        assert_eq!(check_invariants(&totals, [&grant], Credits::ZERO), Ok(()));
        grant.remaining = Credits::from_whole(11).unwrap();
        assert!(matches!(
            check_invariants(&totals, [&grant], Credits::ZERO),
            Err(InvariantViolation::GrantRemaining { .. })
        ));
    }
}
