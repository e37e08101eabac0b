//! Wire messages into core types, validated once where they are received. Every error names
//! the field (`"amount: 7 decimals, at most 6 allowed"`) and becomes `INVALID_ARGUMENT`.
//! Also the few encoders from core types to wire messages that every service shares.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use tollgate_core::command::{
    Adjust, CloseGrant, CloseKind, CreateAccount, GrantTerms, IssueGrant, Memo, Metadata, Refund,
    UpdateAccount,
};
use tollgate_core::grant::{EXTERNAL_REF_LEN_MAX, SCOPE_FEATURES_MAX};
use tollgate_core::{
    AccountId, Credits, Currency, DebitId, EntryKind, FeatureKey, Grant, GrantId, GrantSource,
    GrantState, IdError, IdempotencyKey, Money, Movement, PriceRule, Scope, Timestamp, Totals,
};

use crate::error::ServiceError;
use crate::pb;

/// Longest page token accepted, in bytes.
pub const PAGE_TOKEN_LEN_MAX: usize = 256;
/// Most entry kinds one filter may name.
pub const FILTER_KINDS_MAX: usize = 8;
/// Most bytes of a cost basis amount's text.
pub const MONEY_TEXT_LEN_MAX: usize = 40;

type Decoded<T> = Result<T, ServiceError>;

/// A required identifier.
pub fn id<T>(field: &str, text: &str) -> Decoded<T>
where
    T: TryFrom<String, Error = IdError>,
{
    T::try_from(text.to_owned()).map_err(|e| ServiceError::invalid(field, e))
}

/// An identifier that may be left empty.
pub fn optional_id<T>(field: &str, text: &str) -> Decoded<Option<T>>
where
    T: TryFrom<String, Error = IdError>,
{
    if text.is_empty() {
        Ok(None)
    } else {
        id(field, text).map(Some)
    }
}

pub fn positive_credits(field: &str, text: &str) -> Decoded<Credits> {
    Credits::parse_positive(text).map_err(|e| ServiceError::invalid(field, e))
}

/// Zero or more; empty means zero.
pub fn non_negative_credits(field: &str, text: &str) -> Decoded<Credits> {
    if text.is_empty() {
        return Ok(Credits::ZERO);
    }
    Credits::parse_non_negative(text).map_err(|e| ServiceError::invalid(field, e))
}

/// Signed and never zero.
pub fn nonzero_credits(field: &str, text: &str) -> Decoded<Credits> {
    let amount = Credits::parse(text).map_err(|e| ServiceError::invalid(field, e))?;
    if amount.is_zero() {
        return Err(ServiceError::invalid(field, "must not be zero"));
    }
    Ok(amount)
}

pub fn timestamp(field: &str, at: &prost_types::Timestamp) -> Decoded<Timestamp> {
    if !(0..1_000_000_000).contains(&at.nanos) {
        return Err(ServiceError::invalid(field, "nanos must be within 0..1e9"));
    }
    let millis = at
        .seconds
        .checked_mul(1_000)
        .and_then(|ms| ms.checked_add(i64::from(at.nanos / 1_000_000)))
        .ok_or_else(|| ServiceError::invalid(field, "outside 1970-01-01 to 9999-12-31"))?;
    Timestamp::from_millis(millis).map_err(|e| ServiceError::invalid(field, e))
}

pub fn optional_timestamp(
    field: &str,
    at: Option<&prost_types::Timestamp>,
) -> Decoded<Option<Timestamp>> {
    at.map(|at| timestamp(field, at)).transpose()
}

pub fn metadata(field: &str, entries: &HashMap<String, String>) -> Decoded<Metadata> {
    let sorted: BTreeMap<String, String> = entries.clone().into_iter().collect();
    Metadata::new(sorted).map_err(|e| ServiceError::invalid(field, e))
}

pub fn memo(field: &str, text: &str) -> Decoded<Memo> {
    Memo::new(text).map_err(|e| ServiceError::invalid(field, e))
}

pub fn page_token(field: &str, text: &str) -> Decoded<Option<String>> {
    if text.len() > PAGE_TOKEN_LEN_MAX {
        return Err(ServiceError::invalid(
            field,
            format!("{} bytes, at most {PAGE_TOKEN_LEN_MAX} allowed", text.len()),
        ));
    }
    Ok((!text.is_empty()).then(|| text.to_owned()))
}

/// Sources a caller may issue directly (rollover, refund and adjustment grants come from their
/// own operations).
pub fn issuable_source(field: &str, value: i32) -> Decoded<GrantSource> {
    let source = match pb::GrantSource::try_from(value) {
        Ok(pb::GrantSource::Purchase) => GrantSource::Purchase,
        Ok(pb::GrantSource::Subscription) => GrantSource::Subscription,
        Ok(pb::GrantSource::Promo) => GrantSource::Promo,
        Ok(pb::GrantSource::Trial) => GrantSource::Trial,
        Ok(pb::GrantSource::TopUp) => GrantSource::TopUp,
        Ok(pb::GrantSource::Unspecified) => {
            return Err(ServiceError::invalid(field, "must be set"));
        }
        Ok(other) => {
            return Err(ServiceError::invalid(
                field,
                format!(
                    "{} grants come only from their own operation",
                    other.as_str_name()
                ),
            ));
        }
        Err(_) => {
            return Err(ServiceError::invalid(
                field,
                format!("unknown value {value}"),
            ))
        }
    };
    Ok(source)
}

pub fn scope(field: &str, scope: Option<&pb::Scope>) -> Decoded<Scope> {
    let Some(scope) = scope.filter(|s| !s.features.is_empty()) else {
        return Ok(Scope::All);
    };
    if scope.features.len() > SCOPE_FEATURES_MAX {
        return Err(ServiceError::invalid(
            field,
            format!(
                "{} features, at most {SCOPE_FEATURES_MAX} allowed",
                scope.features.len()
            ),
        ));
    }
    let features = scope
        .features
        .iter()
        .map(|feature| id::<FeatureKey>(&format!("{field}.features"), feature))
        .collect::<Decoded<BTreeSet<_>>>()?;
    Ok(Scope::Features(features))
}

pub fn money(field: &str, money: Option<&pb::Money>) -> Decoded<Option<Money>> {
    let Some(money) = money else {
        return Ok(None);
    };
    if money.amount.len() > MONEY_TEXT_LEN_MAX {
        return Err(ServiceError::invalid(
            &format!("{field}.amount"),
            "too long",
        ));
    }
    let amount = money
        .amount
        .parse::<rust_decimal::Decimal>()
        .ok()
        .filter(|amount| !amount.is_sign_negative())
        .ok_or_else(|| {
            ServiceError::invalid(&format!("{field}.amount"), "not a decimal of zero or more")
        })?;
    let currency = Currency::new(&money.currency).ok_or_else(|| {
        ServiceError::invalid(&format!("{field}.currency"), "not an ISO 4217 code")
    })?;
    Ok(Some(Money { amount, currency }))
}

fn external_ref(field: &str, text: &str) -> Decoded<Option<String>> {
    if text.len() > EXTERNAL_REF_LEN_MAX {
        return Err(ServiceError::invalid(
            field,
            format!(
                "{} bytes, at most {EXTERNAL_REF_LEN_MAX} allowed",
                text.len()
            ),
        ));
    }
    Ok((!text.is_empty()).then(|| text.to_owned()))
}

pub fn entry_kind(field: &str, value: i32) -> Decoded<EntryKind> {
    let kind = match pb::EntryKind::try_from(value) {
        Ok(pb::EntryKind::Grant) => EntryKind::Grant,
        Ok(pb::EntryKind::Debit) => EntryKind::Debit,
        Ok(pb::EntryKind::Refund) => EntryKind::Refund,
        Ok(pb::EntryKind::Expire) => EntryKind::Expire,
        Ok(pb::EntryKind::Rollover) => EntryKind::Rollover,
        Ok(pb::EntryKind::Void) => EntryKind::Void,
        Ok(pb::EntryKind::Adjust) => EntryKind::Adjust,
        Ok(pb::EntryKind::Settle) => EntryKind::Settle,
        Ok(pb::EntryKind::Unspecified) | Err(_) => {
            return Err(ServiceError::invalid(
                field,
                format!("unknown entry kind {value}"),
            ));
        }
    };
    Ok(kind)
}

impl TryFrom<pb::CreateAccountRequest> for CreateAccount {
    type Error = ServiceError;
    fn try_from(request: pb::CreateAccountRequest) -> Decoded<Self> {
        Ok(CreateAccount {
            key: id("idempotency_key", &request.idempotency_key)?,
            account: id("account_id", &request.account_id)?,
            overdraft_limit: non_negative_credits("overdraft_limit", &request.overdraft_limit)?,
            metadata: metadata("metadata", &request.metadata)?,
        })
    }
}

/// The ledger's part of an account update (its overdraft limit and metadata); the authority's
/// settings in the same request are decoded where they are kept.
impl TryFrom<&pb::UpdateAccountRequest> for UpdateAccount {
    type Error = ServiceError;
    fn try_from(request: &pb::UpdateAccountRequest) -> Decoded<Self> {
        let overdraft_limit = match &request.overdraft_limit {
            None => None,
            Some(text) if text.is_empty() => {
                return Err(ServiceError::invalid(
                    "overdraft_limit",
                    "empty; leave the field unset to keep the current limit",
                ))
            }
            Some(text) => Some(non_negative_credits("overdraft_limit", text)?),
        };
        Ok(UpdateAccount {
            key: id("idempotency_key", &request.idempotency_key)?,
            account: id("account_id", &request.account_id)?,
            overdraft_limit,
            metadata: metadata("metadata", &request.metadata)?,
            replace_metadata: request.replace_metadata,
        })
    }
}

/// Whether an update request touches what the ledger keeps (so the ledger is called at all).
pub fn changes_ledger_terms(request: &pb::UpdateAccountRequest) -> bool {
    request.overdraft_limit.is_some() || !request.metadata.is_empty() || request.replace_metadata
}

impl TryFrom<pb::IssueGrantRequest> for IssueGrant {
    type Error = ServiceError;
    fn try_from(request: pb::IssueGrantRequest) -> Decoded<Self> {
        let terms = GrantTerms {
            id: id("grant_id", &request.grant_id)?,
            amount: positive_credits("amount", &request.amount)?,
            source: issuable_source("source", request.source)?,
            priority: request.priority,
            effective_at: optional_timestamp("effective_at", request.effective_at.as_ref())?,
            expires_at: optional_timestamp("expires_at", request.expires_at.as_ref())?,
            scope: scope("scope", request.scope.as_ref())?,
            cost_basis: money("cost_basis", request.cost_basis.as_ref())?,
            external_ref: external_ref("external_ref", &request.external_ref)?,
        };
        if let (Some(effective_at), Some(expires_at)) = (terms.effective_at, terms.expires_at) {
            if expires_at <= effective_at {
                return Err(ServiceError::invalid(
                    "expires_at",
                    "must be after effective_at",
                ));
            }
        }
        Ok(IssueGrant {
            key: id("idempotency_key", &request.idempotency_key)?,
            account: id("account_id", &request.account_id)?,
            terms,
            metadata: metadata("metadata", &request.metadata)?,
            memo: memo("memo", &request.memo)?,
        })
    }
}

fn close(
    key: &str,
    account: &str,
    grant: &str,
    text: &str,
    kind: CloseKind,
) -> Decoded<CloseGrant> {
    Ok(CloseGrant {
        key: id("idempotency_key", key)?,
        account: id("account_id", account)?,
        grant: id("grant_id", grant)?,
        kind,
        memo: memo("memo", text)?,
    })
}

impl TryFrom<pb::VoidGrantRequest> for CloseGrant {
    type Error = ServiceError;
    fn try_from(r: pb::VoidGrantRequest) -> Decoded<Self> {
        close(
            &r.idempotency_key,
            &r.account_id,
            &r.grant_id,
            &r.memo,
            CloseKind::Void,
        )
    }
}

impl TryFrom<pb::ExpireGrantRequest> for CloseGrant {
    type Error = ServiceError;
    fn try_from(r: pb::ExpireGrantRequest) -> Decoded<Self> {
        close(
            &r.idempotency_key,
            &r.account_id,
            &r.grant_id,
            &r.memo,
            CloseKind::Expire,
        )
    }
}

impl TryFrom<pb::RefundRequest> for Refund {
    type Error = ServiceError;
    fn try_from(request: pb::RefundRequest) -> Decoded<Self> {
        Ok(Refund {
            key: id("idempotency_key", &request.idempotency_key)?,
            account: id("account_id", &request.account_id)?,
            debit: id::<DebitId>("debit_id", &request.debit_id)?,
            amount: positive_credits("amount", &request.amount)?,
            refund_grant_id: optional_id::<GrantId>("refund_grant_id", &request.refund_grant_id)?,
            refund_grant_expires_at: optional_timestamp(
                "refund_grant_expires_at",
                request.refund_grant_expires_at.as_ref(),
            )?,
            memo: memo("memo", &request.memo)?,
        })
    }
}

impl TryFrom<pb::AdjustRequest> for Adjust {
    type Error = ServiceError;
    fn try_from(request: pb::AdjustRequest) -> Decoded<Self> {
        let memo = memo("memo", &request.memo)?;
        if memo.is_empty() {
            return Err(ServiceError::invalid(
                "memo",
                "an adjustment needs a reason",
            ));
        }
        Ok(Adjust {
            key: id("idempotency_key", &request.idempotency_key)?,
            account: id("account_id", &request.account_id)?,
            amount: nonzero_credits("amount", &request.amount)?,
            grant_id: optional_id("grant_id", &request.grant_id)?,
            memo,
            beyond_overdraft: request.beyond_overdraft,
            out: Default::default(),
        })
    }
}

/// A validated `ListEntries` request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EntryQuery {
    pub account: AccountId,
    pub kinds: Vec<EntryKind>,
    pub grant: Option<GrantId>,
    pub debit: Option<DebitId>,
    pub from: Option<Timestamp>,
    pub until: Option<Timestamp>,
    pub page_size: u32,
    pub page_token: Option<String>,
}

impl TryFrom<pb::ListEntriesRequest> for EntryQuery {
    type Error = ServiceError;
    fn try_from(request: pb::ListEntriesRequest) -> Decoded<Self> {
        if request.kinds.len() > FILTER_KINDS_MAX {
            return Err(ServiceError::invalid(
                "kinds",
                format!("at most {FILTER_KINDS_MAX}"),
            ));
        }
        let query = EntryQuery {
            account: id("account_id", &request.account_id)?,
            kinds: request
                .kinds
                .iter()
                .map(|kind| entry_kind("kinds", *kind))
                .collect::<Decoded<_>>()?,
            grant: optional_id("grant_id", &request.grant_id)?,
            debit: optional_id("debit_id", &request.debit_id)?,
            from: optional_timestamp("from", request.from.as_ref())?,
            until: optional_timestamp("until", request.until.as_ref())?,
            page_size: request.page_size,
            page_token: page_token("page_token", &request.page_token)?,
        };
        Ok(query)
    }
}

/// A validated `ListGrants` request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GrantQuery {
    pub account: AccountId,
    pub open_only: bool,
    pub page_size: u32,
    pub page_token: Option<String>,
}

impl TryFrom<pb::ListGrantsRequest> for GrantQuery {
    type Error = ServiceError;
    fn try_from(request: pb::ListGrantsRequest) -> Decoded<Self> {
        Ok(GrantQuery {
            account: id("account_id", &request.account_id)?,
            open_only: request.open_only,
            page_size: request.page_size,
            page_token: page_token("page_token", &request.page_token)?,
        })
    }
}

/// The idempotency key alone, for calls whose other fields are decoded elsewhere.
pub fn idempotency_key(text: &str) -> Decoded<IdempotencyKey> {
    id("idempotency_key", text)
}

// ---- Encoders shared by every service ---------------------------------------------------------

pub fn timestamp_to_pb(at: Timestamp) -> prost_types::Timestamp {
    let millis = at.millis();
    prost_types::Timestamp {
        seconds: millis.div_euclid(1_000),
        // Within 0..1e9 by construction.
        nanos: i32::try_from(millis.rem_euclid(1_000) * 1_000_000).unwrap_or(0),
    }
}

pub fn entry_kind_to_pb(kind: EntryKind) -> pb::EntryKind {
    match kind {
        EntryKind::Grant => pb::EntryKind::Grant,
        EntryKind::Debit => pb::EntryKind::Debit,
        EntryKind::Refund => pb::EntryKind::Refund,
        EntryKind::Expire => pb::EntryKind::Expire,
        EntryKind::Rollover => pb::EntryKind::Rollover,
        EntryKind::Void => pb::EntryKind::Void,
        EntryKind::Adjust => pb::EntryKind::Adjust,
        EntryKind::Settle => pb::EntryKind::Settle,
    }
}

pub fn grant_source_to_pb(source: GrantSource) -> pb::GrantSource {
    match source {
        GrantSource::Purchase => pb::GrantSource::Purchase,
        GrantSource::Subscription => pb::GrantSource::Subscription,
        GrantSource::Promo => pb::GrantSource::Promo,
        GrantSource::Trial => pb::GrantSource::Trial,
        GrantSource::TopUp => pb::GrantSource::TopUp,
        GrantSource::Rollover => pb::GrantSource::Rollover,
        GrantSource::Refund => pb::GrantSource::Refund,
        GrantSource::Adjustment => pb::GrantSource::Adjustment,
    }
}

pub fn price_rule_to_pb(rule: PriceRule) -> pb::PriceRule {
    match rule {
        PriceRule::AccountContract => pb::PriceRule::AccountContract,
        PriceRule::PlanRegion => pb::PriceRule::PlanRegion,
        PriceRule::Plan => pb::PriceRule::Plan,
        PriceRule::Region => pb::PriceRule::Region,
        PriceRule::Default => pb::PriceRule::Default,
    }
}

impl From<&Movement> for pb::Movement {
    fn from(movement: &Movement) -> Self {
        pb::Movement {
            kind: entry_kind_to_pb(movement.kind).into(),
            amount: movement.amount.to_string(),
            grant_id: movement
                .grant_id
                .as_ref()
                .map(ToString::to_string)
                .unwrap_or_default(),
        }
    }
}

impl From<&Totals> for pb::Totals {
    fn from(totals: &Totals) -> Self {
        pb::Totals {
            granted: totals.granted.to_string(),
            debited: totals.debited.to_string(),
            refunded: totals.refunded.to_string(),
            expired: totals.expired.to_string(),
            voided: totals.voided.to_string(),
            adjusted: totals.adjusted.to_string(),
        }
    }
}

/// A grant on the wire (the account, labels and creation time come from its store record).
pub fn grant_to_pb(account: &AccountId, grant: &Grant) -> pb::Grant {
    let state = match grant.state {
        GrantState::Open => pb::GrantState::Open,
        GrantState::Expired => pb::GrantState::Expired,
        GrantState::Voided => pb::GrantState::Voided,
    };
    let features = match &grant.scope {
        Scope::All => Vec::new(),
        Scope::Features(features) => features.iter().map(ToString::to_string).collect(),
    };
    pb::Grant {
        account_id: account.to_string(),
        grant_id: grant.id.to_string(),
        amount: grant.amount.to_string(),
        remaining: grant.remaining.to_string(),
        priority: grant.priority,
        effective_at: Some(timestamp_to_pb(grant.effective_at)),
        expires_at: grant.expires_at.map(timestamp_to_pb),
        scope: Some(pb::Scope { features }),
        source: grant_source_to_pb(grant.source).into(),
        state: state.into(),
        cost_basis: grant.cost_basis.map(|money| pb::Money {
            amount: money.amount.to_string(),
            currency: money.currency.as_str().to_owned(),
        }),
        external_ref: grant.external_ref.clone().unwrap_or_default(),
        metadata: HashMap::new(),
        created_at: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn issue() -> pb::IssueGrantRequest {
        pb::IssueGrantRequest {
            idempotency_key: "k-1".into(),
            account_id: "acme".into(),
            grant_id: "g1".into(),
            amount: "10".into(),
            source: pb::GrantSource::Purchase.into(),
            ..Default::default()
        }
    }

    fn message(request: pb::IssueGrantRequest) -> String {
        IssueGrant::try_from(request).unwrap_err().message
    }

    #[test]
    fn a_valid_request_decodes() {
        let grant = IssueGrant::try_from(issue()).unwrap();
        assert_eq!(grant.terms.amount, Credits::from_whole(10).unwrap());
        assert_eq!(grant.terms.scope, Scope::All);
    }

    #[test]
    fn every_error_names_its_field() {
        let mut r = issue();
        r.amount = "0.0000001".into();
        assert_eq!(message(r), "amount: 7 decimals, at most 6 allowed");
        let mut r = issue();
        r.amount = "-5".into();
        assert_eq!(message(r), "amount: must not be negative");
        let mut r = issue();
        r.account_id = String::new();
        assert_eq!(message(r), "account_id: must not be empty");
        let mut r = issue();
        r.grant_id = "g".repeat(129);
        assert_eq!(message(r), "grant_id: 129 bytes, at most 128 allowed");
        let mut r = issue();
        r.source = pb::GrantSource::Refund.into();
        assert!(message(r).starts_with("source: "));
        let mut r = issue();
        r.metadata.insert("k".into(), "v".repeat(5_000));
        assert_eq!(message(r), "metadata: 5001 bytes, at most 4096 allowed");
        let mut r = issue();
        r.scope = Some(pb::Scope {
            features: vec!["bad feature".into()],
        });
        assert!(message(r).starts_with("scope.features: "));
        let mut r = issue();
        r.cost_basis = Some(pb::Money {
            amount: "9.99".into(),
            currency: "eur".into(),
        });
        assert_eq!(message(r), "cost_basis.currency: not an ISO 4217 code");
        let mut r = issue();
        r.effective_at = Some(prost_types::Timestamp {
            seconds: 10,
            nanos: 0,
        });
        r.expires_at = Some(prost_types::Timestamp {
            seconds: 5,
            nanos: 0,
        });
        assert_eq!(message(r), "expires_at: must be after effective_at");
    }

    #[test]
    fn timestamps_keep_milliseconds_and_refuse_nonsense() {
        let at = prost_types::Timestamp {
            seconds: 1_700_000_000,
            nanos: 123_999_999,
        };
        let decoded = timestamp("t", &at).unwrap();
        assert_eq!(decoded.millis(), 1_700_000_000_123);
        assert_eq!(timestamp_to_pb(decoded).nanos, 123_000_000);
        let negative = prost_types::Timestamp {
            seconds: -1,
            nanos: 0,
        };
        assert!(timestamp("t", &negative).is_err());
        let bad_nanos = prost_types::Timestamp {
            seconds: 1,
            nanos: -1,
        };
        assert!(timestamp("t", &bad_nanos).is_err());
    }

    #[test]
    fn adjustments_need_a_nonzero_amount_and_a_reason() {
        let adjust = |amount: &str, memo: &str| {
            Adjust::try_from(pb::AdjustRequest {
                idempotency_key: "k".into(),
                account_id: "acme".into(),
                amount: amount.into(),
                grant_id: String::new(),
                memo: memo.into(),
                beyond_overdraft: false,
            })
        };
        assert!(adjust("-2.5", "ticket 1").is_ok());
        assert_eq!(
            adjust("0", "ticket 1").unwrap_err().message,
            "amount: must not be zero"
        );
        assert_eq!(
            adjust("1", "").unwrap_err().message,
            "memo: an adjustment needs a reason"
        );
    }
}
