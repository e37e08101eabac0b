//! Purchases: credits bought with money, granted **exactly once per payment reference**, and
//! refunds of what is left of them at the price that was paid.
//!
//! A purchase is an ordinary `purchase` grant whose cost basis is the money paid and whose
//! external reference is the payment provider's id of the payment. Both the grant id and the
//! ledger's idempotency key are derived from that reference (`purchase:<digest>`), so every
//! retry — whatever key the caller sent, through gRPC or a provider's webhook — lands on the
//! same ledger operation: the first one grants, the others replay it, and the same reference
//! with different terms is a conflict. Nothing here reads a clock or does I/O beyond the
//! ledger calls it is handed.

use rust_decimal::{Decimal, RoundingStrategy};
use sha2::{Digest, Sha256};
use thiserror::Error;
use tollgate_core::command::{GrantTerms, IssueGrant, Memo, Metadata};
use tollgate_core::grant::EXTERNAL_REF_LEN_MAX;
use tollgate_core::{
    AccountId, Credits, Currency, EntryKind, GrantId, GrantSource, IdempotencyKey, Money, Scope,
    Timestamp,
};
use tollgate_ledger::{GrantRecord, LedgerError, LedgerStore, Outcome, Receipt, RefusalCode};

/// Longest payment reference, in bytes (it is stored as the grant's external reference).
pub const PAYMENT_REFERENCE_LEN_MAX: usize = EXTERNAL_REF_LEN_MAX;
/// Hex digits of the reference's sha256 kept in derived ids (128 bits: collisions are not a
/// practical concern, and the ids stay short).
pub const REFERENCE_DIGEST_HEX_LEN: usize = 32;
/// Prefix of the derived grant id and idempotency key.
pub const PURCHASE_ID_PREFIX: &str = "purchase:";
/// Largest amount of money one purchase may carry (whole units of any currency); it keeps
/// every refund computation far from the decimal type's limits.
pub const MONEY_AMOUNT_MAX: i64 = 1_000_000_000_000_000;

/// Currencies whose minor unit is the unit itself (Stripe's "zero-decimal" currencies).
const ZERO_DECIMAL_CURRENCIES: [&str; 16] = [
    "BIF", "CLP", "DJF", "GNF", "JPY", "KMF", "KRW", "MGA", "PYG", "RWF", "UGX", "VND", "VUV",
    "XAF", "XOF", "XPF",
];
/// Currencies with three decimals (a thousandth is the minor unit).
const THREE_DECIMAL_CURRENCIES: [&str; 5] = ["BHD", "JOD", "KWD", "OMR", "TND"];

/// Decimals of the currency's minor unit as payment providers count it: 0 for JPY or KRW, 3
/// for KWD, 2 for the rest.
pub fn minor_unit_digits(currency: Currency) -> u32 {
    let code = currency.as_str();
    if ZERO_DECIMAL_CURRENCIES.contains(&code) {
        0
    } else if THREE_DECIMAL_CURRENCIES.contains(&code) {
        3
    } else {
        2
    }
}

/// An amount in minor units (`1999` cents, `500` yen) as money.
pub fn money_from_minor_units(minor_units: i64, currency: Currency) -> Money {
    Money {
        amount: Decimal::new(minor_units, minor_unit_digits(currency)),
        currency,
    }
}

/// Why a purchase's terms are not acceptable; `field` names the request field.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
#[error("{field}: {problem}")]
pub struct TermsError {
    pub field: &'static str,
    pub problem: String,
}

fn terms_error(field: &'static str, problem: impl Into<String>) -> TermsError {
    TermsError {
        field,
        problem: problem.into(),
    }
}

/// Checks a payment reference: 1 to [`PAYMENT_REFERENCE_LEN_MAX`] bytes of printable ASCII.
pub fn check_payment_reference(reference: &str) -> Result<(), TermsError> {
    const FIELD: &str = "payment_reference";
    if reference.is_empty() {
        return Err(terms_error(FIELD, "must be set"));
    }
    if reference.len() > PAYMENT_REFERENCE_LEN_MAX {
        return Err(terms_error(
            FIELD,
            format!(
                "{} bytes, at most {PAYMENT_REFERENCE_LEN_MAX} allowed",
                reference.len()
            ),
        ));
    }
    if !reference.chars().all(|c| c.is_ascii_graphic()) {
        return Err(terms_error(
            FIELD,
            "only printable ASCII without spaces is allowed",
        ));
    }
    Ok(())
}

/// Checks money paid for a purchase: zero or more, below [`MONEY_AMOUNT_MAX`], and no finer
/// than the currency's minor unit (`9.999 USD` is not a payment).
pub fn check_money(field: &'static str, money: &Money) -> Result<(), TermsError> {
    if money.amount.is_sign_negative() {
        return Err(terms_error(field, "must be zero or more"));
    }
    if money.amount >= Decimal::from(MONEY_AMOUNT_MAX) {
        return Err(terms_error(
            field,
            format!("must be less than {MONEY_AMOUNT_MAX}"),
        ));
    }
    let digits = minor_unit_digits(money.currency);
    if money.amount.normalize().scale() > digits {
        return Err(terms_error(
            field,
            format!(
                "{} has {digits} decimals, {} is finer than that",
                money.currency.as_str(),
                money.amount
            ),
        ));
    }
    Ok(())
}

fn reference_digest(reference: &str) -> String {
    let digest = hex::encode(Sha256::digest(reference.as_bytes()));
    digest[..REFERENCE_DIGEST_HEX_LEN].to_owned()
}

/// The grant id of the purchase paid under `reference`.
pub fn purchase_grant_id(reference: &str) -> GrantId {
    // Only `[a-z0-9:]` characters, well under the length limit: always a valid id.
    GrantId::new(format!(
        "{PURCHASE_ID_PREFIX}{}",
        reference_digest(reference)
    ))
    .unwrap_or_else(|_| unreachable!("a derived grant id is always valid"))
}

/// The ledger idempotency key of the purchase paid under `reference`.
pub fn purchase_key(reference: &str) -> IdempotencyKey {
    IdempotencyKey::new(format!(
        "{PURCHASE_ID_PREFIX}{}",
        reference_digest(reference)
    ))
    .unwrap_or_else(|_| unreachable!("a derived key is always valid"))
}

/// A validated purchase: who gets how many credits for what money, under which reference.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PurchaseOrder {
    pub account: AccountId,
    pub credits: Credits,
    pub money: Money,
    pub payment_reference: String,
    /// `None`: the purchase source's default priority.
    pub priority: Option<u32>,
    pub expires_at: Option<Timestamp>,
    pub scope: Scope,
    pub metadata: Metadata,
    pub memo: Memo,
}

impl PurchaseOrder {
    /// Checks what the types alone do not: a positive amount, a reference, money in minor units.
    pub fn validate(&self) -> Result<(), TermsError> {
        if !self.credits.is_positive() {
            return Err(terms_error("credits", "must be more than zero"));
        }
        check_payment_reference(&self.payment_reference)?;
        check_money("money.amount", &self.money)
    }

    /// The ledger command; the same order always gives the same command (no clock, no key of
    /// the caller's), which is what makes a retry a replay.
    pub fn command(&self) -> IssueGrant {
        IssueGrant {
            key: purchase_key(&self.payment_reference),
            account: self.account.clone(),
            terms: GrantTerms {
                id: purchase_grant_id(&self.payment_reference),
                amount: self.credits,
                source: GrantSource::Purchase,
                priority: self.priority,
                effective_at: None,
                expires_at: self.expires_at,
                scope: self.scope.clone(),
                cost_basis: Some(self.money),
                external_ref: Some(self.payment_reference.clone()),
            },
            metadata: self.metadata.clone(),
            memo: self.memo.clone(),
        }
    }

    /// Whether a stored grant is this order's purchase (same terms).
    fn is_granted_by(&self, record: &GrantRecord) -> bool {
        let grant = &record.grant;
        record.account == self.account
            && grant.source == GrantSource::Purchase
            && grant.amount == self.credits
            && grant.cost_basis == Some(self.money)
            && grant.external_ref.as_deref() == Some(self.payment_reference.as_str())
            && grant.priority
                == self
                    .priority
                    .unwrap_or(GrantSource::Purchase.default_priority())
            && grant.expires_at == self.expires_at
            && grant.scope == self.scope
            && record.metadata == self.metadata
    }
}

#[derive(Debug, Error)]
pub enum PurchaseError {
    #[error(
        "payment_reference: {reference:?} was already used for a different purchase ({detail})"
    )]
    ReferenceConflict { reference: String, detail: String },
    #[error("grant_id: {grant} is a {kind} grant, not a purchase")]
    NotAPurchase { grant: GrantId, kind: &'static str },
    #[error("{0}")]
    Terms(#[from] TermsError),
    #[error("money due does not fit: {0}")]
    Arithmetic(String),
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    /// Taking the purchase's credits back from the regions failed or must wait (the message
    /// says which); nothing was voided.
    #[error(transparent)]
    Closing(crate::AuthorityError),
}

impl From<crate::AuthorityError> for PurchaseError {
    fn from(error: crate::AuthorityError) -> Self {
        match error {
            crate::AuthorityError::Ledger(ledger) => PurchaseError::Ledger(ledger),
            other => PurchaseError::Closing(other),
        }
    }
}

/// What a purchase did: the ledger's outcome (a replay says `replayed`) and the grant as it
/// stands now (absent when refused).
#[derive(Clone, Debug)]
pub struct PurchaseResult {
    pub outcome: Outcome,
    pub grant: Option<GrantRecord>,
}

/// Grants the order's credits exactly once per payment reference.
pub async fn purchase(
    ledger: &dyn LedgerStore,
    order: &PurchaseOrder,
    now: Timestamp,
) -> Result<PurchaseResult, PurchaseError> {
    order.validate()?;
    let command = order.command();
    let grant_id = command.terms.id.clone();
    let key = command.key.clone();
    let outcome = match ledger.issue_grant(command, now).await {
        Ok(outcome) => outcome,
        Err(LedgerError::IdempotencyConflict { account, .. }) => {
            return Err(PurchaseError::ReferenceConflict {
                reference: order.payment_reference.clone(),
                detail: format!("first recorded on account {account}"),
            })
        }
        Err(error) => return Err(error.into()),
    };
    match outcome {
        Ok(receipt) => {
            let grant = ledger.grant(&order.account, &grant_id).await?;
            Ok(PurchaseResult {
                outcome: Ok(receipt),
                grant,
            })
        }
        // The grant exists but the idempotency record does not: it was forgotten after its
        // retention (or the id was taken by a plain IssueGrant). The grant itself decides.
        Err(refusal) if refusal.code == RefusalCode::DuplicateGrant => {
            let record = ledger
                .grant(&order.account, &grant_id)
                .await?
                .ok_or_else(|| {
                    LedgerError::Corrupt(format!(
                        "grant {grant_id} refused as duplicate, not found"
                    ))
                })?;
            if !order.is_granted_by(&record) {
                return Err(PurchaseError::ReferenceConflict {
                    reference: order.payment_reference.clone(),
                    detail: format!("grant {grant_id} has other terms"),
                });
            }
            let snapshot = ledger.account(&order.account).await?;
            let receipt = Receipt {
                account: order.account.clone(),
                operation: format!("key:{key}"),
                movements: Vec::new(),
                first_seq: 0,
                last_seq: 0,
                balance: snapshot.balance,
                grant_id: Some(grant_id),
                recorded_at: record.created_at,
                replayed: true,
            };
            Ok(PurchaseResult {
                outcome: Ok(receipt),
                grant: Some(record),
            })
        }
        Err(refusal) => Ok(PurchaseResult {
            outcome: Err(refusal),
            grant: None,
        }),
    }
}

/// `voided × paid / credits`, rounded half-to-even to the currency's minor unit: the share of
/// the money that the unused credits stand for.
pub fn money_due(voided: Credits, credits: Credits, paid: Money) -> Result<Money, PurchaseError> {
    let digits = minor_unit_digits(paid.currency);
    let mut amount = if voided == credits {
        paid.amount
    } else if voided.is_zero() {
        Decimal::ZERO
    } else {
        if !credits.is_positive() || voided.is_negative() || voided > credits {
            return Err(PurchaseError::Arithmetic(format!(
                "{voided} voided of a {credits} credit purchase"
            )));
        }
        paid.amount
            .checked_mul(voided.to_decimal())
            .and_then(|product| product.checked_div(credits.to_decimal()))
            .ok_or_else(|| PurchaseError::Arithmetic(format!("{} × {voided}", paid.amount)))?
            .round_dp_with_strategy(digits, RoundingStrategy::MidpointNearestEven)
    };
    amount.rescale(digits);
    Ok(Money {
        amount,
        currency: paid.currency,
    })
}

/// A refund of a purchase's unused credits.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RefundOrder {
    pub key: IdempotencyKey,
    pub account: AccountId,
    pub grant: GrantId,
    pub memo: Memo,
}

#[derive(Clone, Debug)]
pub struct RefundResult {
    pub outcome: Outcome,
    pub grant: GrantId,
    /// Credits the refund voided (zero when refused or when the purchase was used up).
    pub credits_voided: Credits,
    /// The money those credits stand for at the grant's cost basis; `None` when the grant has
    /// no cost basis or the refund was refused.
    pub money_due: Option<Money>,
}

/// Voids what is left of a purchase grant, idempotent by the order's key, and says how much
/// money that remainder stands for. `closer` takes the grant's credits back from the regions
/// first (the authority; see `closing`), so what is voided, and owed back, is what no region
/// can spend any more.
pub async fn refund_purchase(
    ledger: &dyn LedgerStore,
    closer: &dyn crate::closing::GrantCloser,
    order: RefundOrder,
    now: Timestamp,
) -> Result<RefundResult, PurchaseError> {
    let record = ledger
        .grant(&order.account, &order.grant)
        .await?
        .ok_or_else(|| LedgerError::UnknownGrant {
            account: order.account.clone(),
            grant: order.grant.clone(),
        })?;
    if record.grant.source != GrantSource::Purchase {
        return Err(PurchaseError::NotAPurchase {
            grant: order.grant,
            kind: record.grant.source.as_str(),
        });
    }
    let grant = order.grant.clone();
    let command = tollgate_core::command::CloseGrant {
        key: order.key,
        account: order.account,
        grant: order.grant,
        kind: tollgate_core::command::CloseKind::Void,
        memo: order.memo,
    };
    let outcome = closer.close_grant(command, now).await?;
    let credits_voided = match &outcome {
        Ok(receipt) => Credits::checked_sum(
            receipt
                .movements
                .iter()
                .filter(|m| m.kind == EntryKind::Void && m.grant_id.as_ref() == Some(&grant))
                .map(|m| m.amount),
        )
        .map_err(|e| PurchaseError::Arithmetic(e.to_string()))?,
        Err(_) => Credits::ZERO,
    };
    let money_due = match (&outcome, record.grant.cost_basis) {
        (Ok(_), Some(paid)) => Some(money_due(credits_voided, record.grant.amount, paid)?),
        _ => None,
    };
    Ok(RefundResult {
        outcome,
        grant,
        credits_voided,
        money_due,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn money(amount: &str, currency: &str) -> Money {
        Money {
            amount: amount.parse().unwrap(),
            currency: Currency::new(currency).unwrap(),
        }
    }

    fn credits(text: &str) -> Credits {
        Credits::parse(text).unwrap()
    }

    #[test]
    fn minor_units_follow_the_currency() {
        let jpy = Currency::new("JPY").unwrap();
        assert_eq!(money_from_minor_units(500, jpy), money("500", "JPY"));
        let krw = Currency::new("KRW").unwrap();
        assert_eq!(
            money_from_minor_units(12_000, krw).amount.to_string(),
            "12000"
        );
        let usd = Currency::new("USD").unwrap();
        assert_eq!(
            money_from_minor_units(1999, usd).amount.to_string(),
            "19.99"
        );
        let kwd = Currency::new("KWD").unwrap();
        assert_eq!(
            money_from_minor_units(1500, kwd).amount.to_string(),
            "1.500"
        );
    }

    #[test]
    fn money_must_fit_the_minor_unit() {
        assert!(check_money("money.amount", &money("9.99", "USD")).is_ok());
        assert!(check_money("money.amount", &money("9.990", "USD")).is_ok());
        assert!(check_money("money.amount", &money("9.999", "USD")).is_err());
        assert!(check_money("money.amount", &money("1.5", "JPY")).is_err());
        assert!(check_money("money.amount", &money("-1", "EUR")).is_err());
    }

    #[test]
    fn money_due_rounds_half_to_even_in_minor_units() {
        let paid = money("10.00", "USD");
        let due = money_due(credits("25"), credits("100"), paid).unwrap();
        assert_eq!(due.amount.to_string(), "2.50");
        // 1/3 of 10.00 = 3.333… → 3.33; 1/8 of 0.10 = 0.0125 → 0.01 (half to even).
        assert_eq!(
            money_due(credits("1"), credits("3"), paid)
                .unwrap()
                .amount
                .to_string(),
            "3.33"
        );
        assert_eq!(
            money_due(credits("1"), credits("8"), money("0.10", "EUR"))
                .unwrap()
                .amount
                .to_string(),
            "0.01"
        );
        // 3/8 of 0.10 = 0.0375 → 0.04.
        assert_eq!(
            money_due(credits("3"), credits("8"), money("0.10", "EUR"))
                .unwrap()
                .amount
                .to_string(),
            "0.04"
        );
        let yen = money_due(credits("1"), credits("2"), money("999", "JPY")).unwrap();
        assert_eq!(yen.amount.to_string(), "500");
        let none = money_due(Credits::ZERO, credits("100"), paid).unwrap();
        assert_eq!(none.amount.to_string(), "0.00");
        let all = money_due(credits("100"), credits("100"), paid).unwrap();
        assert_eq!(all.amount, paid.amount);
        assert!(money_due(credits("101"), credits("100"), paid).is_err());
    }

    #[test]
    fn derived_ids_depend_only_on_the_reference() {
        let a = purchase_grant_id("cs_test_123");
        assert_eq!(a, purchase_grant_id("cs_test_123"));
        assert_ne!(a, purchase_grant_id("cs_test_124"));
        assert!(a.as_str().starts_with(PURCHASE_ID_PREFIX));
        assert_eq!(
            a.as_str().len(),
            PURCHASE_ID_PREFIX.len() + REFERENCE_DIGEST_HEX_LEN
        );
        assert_eq!(purchase_key("x").as_str(), purchase_grant_id("x").as_str());
    }

    #[test]
    fn references_are_checked() {
        assert!(check_payment_reference("in_1Abc").is_ok());
        assert_eq!(
            check_payment_reference("").unwrap_err().field,
            "payment_reference"
        );
        assert!(check_payment_reference("a b").is_err());
        assert!(check_payment_reference(&"x".repeat(PAYMENT_REFERENCE_LEN_MAX + 1)).is_err());
    }
}
