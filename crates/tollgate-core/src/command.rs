//! The authority's commands as plain, validated data: what an admin or the reconciler asks the
//! ledger to do. Wire decoders build them (validating every field once); stores execute them.
//!
//! A command carries no server time: the store is handed "now" separately, so that a replay
//! with the same idempotency key is the same command and fingerprints equal.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::burn::BurnPlan;
use crate::credits::Credits;
use crate::error::AmountError;
use crate::grant::{Grant, GrantSource, Money, Scope};
use crate::ids::{AccountId, ActorId, DebitId, FeatureKey, GrantId, IdempotencyKey, RegionId};
use crate::ledger::EntryKind;
use crate::price::PriceRule;
use crate::recurrence::GrantSchedule;
use crate::time::Timestamp;

/// Most entries in one metadata map.
pub const METADATA_ENTRIES_MAX: usize = 32;
/// Most bytes of one metadata key.
pub const METADATA_KEY_LEN_MAX: usize = 64;
/// Most bytes of all keys and values of one metadata map together.
pub const METADATA_BYTES_MAX: usize = 4_096;
/// Most bytes of a free-text memo on a mutation (a reason, a ticket reference).
pub const MEMO_LEN_MAX: usize = 512;
/// Most draws one debit may carry (a debit spanning more grants than this is refused).
pub const DEBIT_DRAWS_MAX: usize = 64;

#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum TextError {
    #[error("{len} bytes, at most {len_max} allowed")]
    TooLong { len: usize, len_max: usize },
    #[error("{entries} entries, at most {entries_max} allowed")]
    TooManyEntries { entries: usize, entries_max: usize },
    #[error("key {key:?} must be 1..={len_max} bytes")]
    BadKey { key: String, len_max: usize },
    #[error("control characters are not allowed")]
    ControlCharacter,
}

/// Free-form labels on accounts and grants, bounded in count and size.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Metadata(BTreeMap<String, String>);

impl Metadata {
    pub fn new(entries: BTreeMap<String, String>) -> Result<Self, TextError> {
        if entries.len() > METADATA_ENTRIES_MAX {
            return Err(TextError::TooManyEntries {
                entries: entries.len(),
                entries_max: METADATA_ENTRIES_MAX,
            });
        }
        let mut bytes = 0_usize;
        for (key, value) in &entries {
            if key.is_empty() || key.len() > METADATA_KEY_LEN_MAX {
                return Err(TextError::BadKey {
                    key: key.chars().take(METADATA_KEY_LEN_MAX).collect(),
                    len_max: METADATA_KEY_LEN_MAX,
                });
            }
            bytes = bytes.saturating_add(key.len()).saturating_add(value.len());
        }
        if bytes > METADATA_BYTES_MAX {
            return Err(TextError::TooLong {
                len: bytes,
                len_max: METADATA_BYTES_MAX,
            });
        }
        Ok(Metadata(entries))
    }

    pub fn entries(&self) -> &BTreeMap<String, String> {
        &self.0
    }
}

/// A short human note on a mutation, at most [`MEMO_LEN_MAX`] bytes, no control characters.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Memo(String);

impl Memo {
    pub fn new(text: impl Into<String>) -> Result<Self, TextError> {
        let text = text.into();
        if text.len() > MEMO_LEN_MAX {
            return Err(TextError::TooLong {
                len: text.len(),
                len_max: MEMO_LEN_MAX,
            });
        }
        if text.chars().any(char::is_control) {
            return Err(TextError::ControlCharacter);
        }
        Ok(Memo(text))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreateAccount {
    pub key: IdempotencyKey,
    pub account: AccountId,
    pub overdraft_limit: Credits,
    pub metadata: Metadata,
}

/// Changes to an account's own terms; what is `None` stays as it is. Metadata entries are
/// merged into what the account has, or replace it all when `replace_metadata` is set.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpdateAccount {
    pub key: IdempotencyKey,
    pub account: AccountId,
    pub overdraft_limit: Option<Credits>,
    pub metadata: Metadata,
    pub replace_metadata: bool,
}

impl UpdateAccount {
    /// The account's metadata after this update, within the same limits as at creation.
    pub fn merged_metadata(&self, current: &Metadata) -> Result<Metadata, TextError> {
        if self.replace_metadata {
            return Ok(self.metadata.clone());
        }
        let mut entries = current.entries().clone();
        entries.extend(self.metadata.entries().clone());
        Metadata::new(entries)
    }
}

/// The terms of a new grant; what the caller leaves out is decided when it is issued.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GrantTerms {
    pub id: GrantId,
    pub amount: Credits,
    pub source: GrantSource,
    /// `None`: the source's default priority.
    pub priority: Option<u32>,
    /// `None`: effective when issued.
    pub effective_at: Option<Timestamp>,
    pub expires_at: Option<Timestamp>,
    pub scope: Scope,
    pub cost_basis: Option<Money>,
    pub external_ref: Option<String>,
}

impl GrantTerms {
    /// Terms with every default: the source's priority, effective when issued, no expiry, every
    /// feature, no cost basis or reference. Set the rest with struct update syntax.
    pub fn new(id: GrantId, amount: Credits, source: GrantSource) -> Self {
        GrantTerms {
            id,
            amount,
            source,
            priority: None,
            effective_at: None,
            expires_at: None,
            scope: Scope::All,
            cost_basis: None,
            external_ref: None,
        }
    }

    /// The grant these terms give when issued at `now`.
    pub fn grant_at(&self, now: Timestamp) -> Grant {
        let mut grant = Grant::new(
            self.id.clone(),
            self.amount,
            self.source,
            self.effective_at.unwrap_or(now),
        )
        .with_scope(self.scope.clone());
        if let Some(priority) = self.priority {
            grant = grant.with_priority(priority);
        }
        grant.expires_at = self.expires_at;
        grant.cost_basis = self.cost_basis;
        grant.external_ref = self.external_ref.clone();
        grant
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IssueGrant {
    pub key: IdempotencyKey,
    pub account: AccountId,
    pub terms: GrantTerms,
    pub metadata: Metadata,
    pub memo: Memo,
}

/// Ends a grant early: `Void` cancels its remainder (a refunded purchase), `Expire` closes it
/// at or after its `expires_at`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CloseKind {
    Void,
    Expire,
}

impl CloseKind {
    pub const fn entry_kind(self) -> EntryKind {
        match self {
            CloseKind::Void => EntryKind::Void,
            CloseKind::Expire => EntryKind::Expire,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CloseGrant {
    pub key: IdempotencyKey,
    pub account: AccountId,
    pub grant: GrantId,
    pub kind: CloseKind,
    pub memo: Memo,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refund {
    pub key: IdempotencyKey,
    pub account: AccountId,
    pub debit: DebitId,
    pub amount: Credits,
    /// Id of the refund grant if one is needed; `None`: derived from the debit id.
    pub refund_grant_id: Option<GrantId>,
    /// Expiry of the refund grant if one is needed; `None`: it never expires.
    pub refund_grant_expires_at: Option<Timestamp>,
    pub memo: Memo,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Adjust {
    pub key: IdempotencyKey,
    pub account: AccountId,
    /// Signed and never zero: positive adds an `adjustment` grant, negative takes credits away.
    pub amount: Credits,
    /// Id of the adjustment grant when positive; `None`: derived from the entry sequence.
    pub grant_id: Option<GrantId>,
    pub memo: Memo,
    /// A negative adjustment may leave debt beyond the account's overdraft limit only when
    /// this is set; without it, such an adjustment is refused and says what the balance would
    /// be. (Left out of the stored form when false, so earlier adjustments replay the same.)
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub beyond_overdraft: bool,
    /// Credits of each grant that regions still hold (on edges' leases, under pending holds)
    /// when a negative adjustment is applied: it leaves them, since a region may still spend
    /// them. Set by the authority after taking back what it could; never part of the request
    /// (not stored, not in its fingerprint: a retry with the same key replays the first answer).
    #[serde(skip)]
    pub out: std::collections::BTreeMap<crate::GrantId, crate::Credits>,
}

/// Settles debt from a grant issued after the debt was run up, when the usage that ran it up
/// reached the ledger only after the grant (see `AccountBook::settle_debt`): at most `amount`,
/// and never more than the debt or what the grant has left.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SettleDebt {
    pub key: IdempotencyKey,
    pub account: AccountId,
    pub grant: GrantId,
    pub amount: Credits,
    pub memo: Memo,
}

/// Closes one period of a recurring grant: the rollover policy carries part of what is left
/// into a `rollover` grant and the rest expires. The next period's grant is issued on its own.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClosePeriod {
    pub key: IdempotencyKey,
    pub account: AccountId,
    pub schedule: GrantSchedule,
    pub index: u64,
    pub memo: Memo,
}

/// One debit decided by a region, as the reconciler hands it to the ledger.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageDebit {
    pub debit_id: DebitId,
    pub idempotency_key: Option<IdempotencyKey>,
    pub account: AccountId,
    pub feature: FeatureKey,
    /// When the credits were spent (not when the debit is reconciled).
    pub at: Timestamp,
    pub plan: BurnPlan,
    pub price_version: u64,
    pub price_rule: PriceRule,
    /// How many units of the feature the caller asked for; `None` when it named the cost.
    /// Absent from the fingerprint when `None`, so a record from before quantities were kept
    /// fingerprints as it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quantity: Option<crate::Quantity>,
    /// The credits per unit it was priced at; `None` when the caller named the cost.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate: Option<crate::Rate>,
    /// The feature's unit ("image", "token") when the debit is recorded, for the reader of the
    /// entry. It names what was counted and charges nothing, so it is not fingerprinted: a
    /// feature whose unit is renamed between a first attempt and its retry is the same debit.
    #[serde(skip)]
    pub unit: Option<String>,
    pub actor: Option<ActorId>,
    pub region: Option<RegionId>,
    /// The hold this debit captured, when it is a capture.
    #[serde(default)]
    pub hold: Option<crate::HoldId>,
}

/// How a captured debit's ledger entry names its hold, in the entry's memo.
pub const CAPTURE_MEMO_PREFIX: &str = "capture of hold ";

/// The hold a debit entry's memo names, when the debit was a capture.
pub fn captured_hold(memo: &str) -> Option<&str> {
    memo.strip_prefix(CAPTURE_MEMO_PREFIX)
        .filter(|hold| !hold.is_empty())
}

impl UsageDebit {
    pub fn amount(&self) -> Credits {
        self.plan.total().unwrap_or(Credits::MAX)
    }

    /// Checks the amounts: every draw more than zero, the overdraft part zero or more, and a
    /// total that fits. (The number of draws is bounded by [`DEBIT_DRAWS_MAX`] where decoded.)
    pub fn validate(&self) -> Result<(), AmountError> {
        if self.plan.overdraft.is_negative() {
            return Err(AmountError::Negative);
        }
        if self
            .plan
            .draws
            .iter()
            .any(|draw| !draw.amount.is_positive())
        {
            return Err(AmountError::Zero);
        }
        self.plan.total().map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_limits() {
        let small: BTreeMap<_, _> = [("plan".to_owned(), "pro".to_owned())].into();
        assert!(Metadata::new(small).is_ok());
        let big: BTreeMap<_, _> = [("k".to_owned(), "v".repeat(METADATA_BYTES_MAX))].into();
        assert_eq!(
            Metadata::new(big),
            Err(TextError::TooLong {
                len: METADATA_BYTES_MAX + 1,
                len_max: METADATA_BYTES_MAX
            })
        );
        let many: BTreeMap<_, _> = (0..=METADATA_ENTRIES_MAX)
            .map(|i| (format!("k{i}"), String::new()))
            .collect();
        assert!(matches!(
            Metadata::new(many),
            Err(TextError::TooManyEntries { .. })
        ));
        let empty_key: BTreeMap<_, _> = [(String::new(), "v".to_owned())].into();
        assert!(matches!(
            Metadata::new(empty_key),
            Err(TextError::BadKey { .. })
        ));
    }

    #[test]
    fn memo_limits() {
        assert!(Memo::new("ticket 42").is_ok());
        assert!(Memo::new("a".repeat(MEMO_LEN_MAX + 1)).is_err());
        assert_eq!(Memo::new("a\nb"), Err(TextError::ControlCharacter));
    }

    #[test]
    fn grant_terms_default_when_issued() {
        let terms = GrantTerms::new(
            GrantId::new("g").unwrap(),
            Credits::from_whole(5).unwrap(),
            GrantSource::Promo,
        );
        let now = Timestamp::from_millis(7).unwrap();
        let grant = terms.grant_at(now);
        assert_eq!(grant.effective_at, now);
        assert_eq!(grant.priority, GrantSource::Promo.default_priority());
        assert_eq!(grant.remaining, grant.amount);
    }
}
