//! Grants: blocks of credits with a priority, a validity window and a scope.

use std::cmp::Ordering;
use std::collections::BTreeSet;

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use crate::credits::Credits;
use crate::error::GrantError;
use crate::ids::{FeatureKey, GrantId};
use crate::time::Timestamp;

/// Longest external reference (a payment id, a ticket), in bytes.
pub const EXTERNAL_REF_LEN_MAX: usize = 256;
/// Most features one grant's scope may name.
pub const SCOPE_FEATURES_MAX: usize = 256;

/// Where a grant's credits came from. Decides its default priority and how reports count it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GrantSource {
    Purchase,
    Subscription,
    Promo,
    Trial,
    TopUp,
    Rollover,
    Refund,
    Adjustment,
}

impl GrantSource {
    pub const ALL: [GrantSource; 8] = [
        GrantSource::Purchase,
        GrantSource::Subscription,
        GrantSource::Promo,
        GrantSource::Trial,
        GrantSource::TopUp,
        GrantSource::Rollover,
        GrantSource::Refund,
        GrantSource::Adjustment,
    ];

    /// DESIGN.md's default priorities (lower burns first). A refund grant keeps the priority of
    /// the grant its debit burned; this default only applies when that is unknown. Adjustments
    /// are treated like purchased credits.
    pub const fn default_priority(self) -> u32 {
        match self {
            GrantSource::Rollover => 5,
            GrantSource::Subscription => 10,
            GrantSource::Trial => 20,
            GrantSource::Promo => 30,
            GrantSource::Purchase
            | GrantSource::TopUp
            | GrantSource::Refund
            | GrantSource::Adjustment => 50,
        }
    }

    pub fn parse(text: &str) -> Option<GrantSource> {
        GrantSource::ALL
            .into_iter()
            .find(|source| source.as_str() == text)
    }

    pub const fn as_str(self) -> &'static str {
        match self {
            GrantSource::Purchase => "purchase",
            GrantSource::Subscription => "subscription",
            GrantSource::Promo => "promo",
            GrantSource::Trial => "trial",
            GrantSource::TopUp => "top_up",
            GrantSource::Rollover => "rollover",
            GrantSource::Refund => "refund",
            GrantSource::Adjustment => "adjustment",
        }
    }
}

/// Which features a grant's credits may pay for.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    #[default]
    All,
    Features(BTreeSet<FeatureKey>),
}

impl GrantState {
    pub const fn as_str(self) -> &'static str {
        match self {
            GrantState::Open => "open",
            GrantState::Expired => "expired",
            GrantState::Voided => "voided",
        }
    }

    pub fn parse(text: &str) -> Option<GrantState> {
        [GrantState::Open, GrantState::Expired, GrantState::Voided]
            .into_iter()
            .find(|state| state.as_str() == text)
    }
}

impl Scope {
    pub fn covers(&self, feature: &FeatureKey) -> bool {
        match self {
            Scope::All => true,
            Scope::Features(features) => features.contains(feature),
        }
    }
}

/// A three-letter ISO 4217 currency code, upper case.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Currency([u8; 3]);

impl Currency {
    pub fn new(code: &str) -> Option<Currency> {
        let bytes: [u8; 3] = code.as_bytes().try_into().ok()?;
        bytes
            .iter()
            .all(u8::is_ascii_uppercase)
            .then_some(Currency(bytes))
    }

    pub fn as_str(&self) -> &str {
        // Only ASCII upper-case letters are ever stored.
        std::str::from_utf8(&self.0).unwrap_or("???")
    }
}

/// Money paid for a grant: its cost basis, for revenue and breakage reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Money {
    pub amount: Decimal,
    pub currency: Currency,
}

/// Whether a grant can still be drawn from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GrantState {
    #[default]
    Open,
    /// Its remainder was expired (final).
    Expired,
    /// Its remainder was voided (for instance a refunded purchase).
    Voided,
}

/// A block of credits for one account.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grant {
    pub id: GrantId,
    pub amount: Credits,
    pub remaining: Credits,
    /// Lower burns first.
    pub priority: u32,
    pub effective_at: Timestamp,
    /// `None`: never expires (burns after every grant that does).
    pub expires_at: Option<Timestamp>,
    pub scope: Scope,
    pub source: GrantSource,
    pub cost_basis: Option<Money>,
    pub external_ref: Option<String>,
    pub state: GrantState,
}

impl Grant {
    /// A new, untouched grant with its source's default priority, effective now and forever.
    pub fn new(id: GrantId, amount: Credits, source: GrantSource, effective_at: Timestamp) -> Self {
        Grant {
            id,
            amount,
            remaining: amount,
            priority: source.default_priority(),
            effective_at,
            expires_at: None,
            scope: Scope::All,
            source,
            cost_basis: None,
            external_ref: None,
            state: GrantState::Open,
        }
    }

    pub fn with_expiry(mut self, expires_at: Timestamp) -> Self {
        self.expires_at = Some(expires_at);
        self
    }

    pub fn with_priority(mut self, priority: u32) -> Self {
        self.priority = priority;
        self
    }

    pub fn with_scope(mut self, scope: Scope) -> Self {
        self.scope = scope;
        self
    }

    /// Checks what must hold of every grant, stored or received.
    pub fn validate(&self) -> Result<(), GrantError> {
        if !self.amount.is_positive() {
            return Err(GrantError::AmountNotPositive);
        }
        if self.remaining.is_negative() || self.remaining > self.amount {
            return Err(GrantError::RemainingOutOfRange {
                remaining: self.remaining,
                amount: self.amount,
            });
        }
        if let Some(expires_at) = self.expires_at {
            if expires_at <= self.effective_at {
                return Err(GrantError::ExpiresBeforeEffective {
                    effective_at: self.effective_at,
                    expires_at,
                });
            }
        }
        if matches!(&self.scope, Scope::Features(features) if features.is_empty()) {
            return Err(GrantError::EmptyScope);
        }
        Ok(())
    }

    /// `effective_at <= t < expires_at`, and neither expired nor voided.
    pub fn is_active_at(&self, at: Timestamp) -> bool {
        self.state == GrantState::Open
            && self.effective_at <= at
            && self.expires_at.is_none_or(|expires_at| at < expires_at)
    }

    /// Active at `t`, covering the feature, with credits left.
    pub fn is_eligible(&self, feature: &FeatureKey, at: Timestamp) -> bool {
        self.is_active_at(at) && self.scope.covers(feature) && self.remaining.is_positive()
    }
}

/// DESIGN.md's burn-down order: priority ascending, then expiry ascending with no expiry last,
/// then effective time, then grant id, so that the order is total and every node agrees on it.
pub fn burn_order(a: &Grant, b: &Grant) -> Ordering {
    burn_key_order(
        (a.priority, a.expires_at, a.effective_at, &a.id),
        (b.priority, b.expires_at, b.effective_at, &b.id),
    )
}

/// [`burn_order`] on the bare keys, for stores that hold slices of grants rather than grants.
pub fn burn_key_order(
    a: (u32, Option<Timestamp>, Timestamp, &GrantId),
    b: (u32, Option<Timestamp>, Timestamp, &GrantId),
) -> Ordering {
    let expiry_key = |expires_at: Option<Timestamp>| (expires_at.is_none(), expires_at);
    a.0.cmp(&b.0)
        .then_with(|| expiry_key(a.1).cmp(&expiry_key(b.1)))
        .then_with(|| a.2.cmp(&b.2))
        .then_with(|| a.3.cmp(b.3))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(millis: i64) -> Timestamp {
        Timestamp::from_millis(millis).unwrap()
    }

    fn grant(id: &str) -> Grant {
        Grant::new(
            GrantId::new(id).unwrap(),
            Credits::from_whole(10).unwrap(),
            GrantSource::Purchase,
            at(100),
        )
    }

    #[test]
    fn activity_window_is_half_open() {
        let g = grant("g").with_expiry(at(200));
        assert!(!g.is_active_at(at(99)));
        assert!(g.is_active_at(at(100)), "effective exactly at t");
        assert!(g.is_active_at(at(199)));
        assert!(!g.is_active_at(at(200)), "expiring exactly at t");
    }

    #[test]
    fn validation_names_the_problem() {
        let mut g = grant("g");
        g.remaining = Credits::from_whole(11).unwrap();
        assert!(matches!(
            g.validate(),
            Err(GrantError::RemainingOutOfRange { .. })
        ));
        let g = grant("g").with_expiry(at(100));
        assert!(matches!(
            g.validate(),
            Err(GrantError::ExpiresBeforeEffective { .. })
        ));
        let g = grant("g").with_scope(Scope::Features(BTreeSet::new()));
        assert_eq!(g.validate(), Err(GrantError::EmptyScope));
    }

    #[test]
    fn no_expiry_burns_last_among_equal_priorities() {
        let never = grant("a");
        let soon = grant("b").with_expiry(at(500));
        assert_eq!(burn_order(&soon, &never), Ordering::Less);
        let later = grant("c").with_expiry(at(900));
        assert_eq!(burn_order(&soon, &later), Ordering::Less);
        let first = grant("z").with_priority(0);
        assert_eq!(burn_order(&first, &soon), Ordering::Less);
    }

    #[test]
    fn names_round_trip() {
        for source in GrantSource::ALL {
            assert_eq!(GrantSource::parse(source.as_str()), Some(source));
        }
        for state in [GrantState::Open, GrantState::Expired, GrantState::Voided] {
            assert_eq!(GrantState::parse(state.as_str()), Some(state));
        }
        for rule in crate::price::PriceRule::ALL {
            assert_eq!(crate::price::PriceRule::parse(rule.as_str()), Some(rule));
        }
        assert_eq!(GrantSource::parse("gift"), None);
    }

    #[test]
    fn currency_codes() {
        assert_eq!(Currency::new("EUR").unwrap().as_str(), "EUR");
        assert!(Currency::new("eur").is_none());
        assert!(Currency::new("EURO").is_none());
    }
}
