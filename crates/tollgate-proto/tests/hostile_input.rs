//! Hostile input against every request conversion: invalid and huge decimals, empty and
//! oversized ids and metadata, unknown enum values, timestamps out of range, and messages
//! truncated on the wire. Each conversion either succeeds with values inside the core's bounds
//! or fails with `INVALID_ARGUMENT` naming a field of the request; it never panics.

use std::collections::HashMap;

use proptest::prelude::*;
use prost::Message;
use tollgate_core::command::{
    Adjust, CloseGrant, CreateAccount, IssueGrant, Refund, UpdateAccount,
};
use tollgate_proto::decode::{EntryQuery, GrantQuery};
use tollgate_proto::{pb, ErrorCode, ServiceError};

/// Text a caller might send where a decimal, an id or a memo is expected.
fn hostile_text() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(String::new()),
        Just(" ".to_owned()),
        Just("-0".to_owned()),
        Just("1e9".to_owned()),
        Just("NaN".to_owned()),
        Just("0.0000001".to_owned()),
        Just("99999999999999999999999999.5".to_owned()),
        Just("9223372036854.775807".to_owned()),
        Just("+1".to_owned()),
        Just("1,5".to_owned()),
        Just("acme\u{0}".to_owned()),
        Just("é".repeat(200)),
        "[0-9]{1,30}(\\.[0-9]{0,9})?",
        "-[0-9]{1,12}(\\.[0-9]{0,7})?",
        "[a-z0-9_.:-]{1,40}",
        ".{0,40}",
        "[a-z]{200,300}",
    ]
}

fn hostile_metadata() -> impl Strategy<Value = HashMap<String, String>> {
    prop::collection::hash_map(hostile_text(), hostile_text(), 0..40)
}

fn hostile_timestamp() -> impl Strategy<Value = Option<prost_types::Timestamp>> {
    prop::option::of(
        (any::<i64>(), any::<i32>())
            .prop_map(|(seconds, nanos)| prost_types::Timestamp { seconds, nanos }),
    )
}

/// The fields each request may name in a refusal (a prefix match: `metadata` covers
/// `metadata[...]`).
fn check<T>(result: Result<T, ServiceError>, fields: &[&str]) -> Option<T> {
    match result {
        Ok(value) => Some(value),
        Err(error) => {
            assert_eq!(error.code, ErrorCode::InvalidArgument, "{error:?}");
            assert!(
                fields.iter().any(|f| error.message.starts_with(f)),
                "{:?} names none of {fields:?}",
                error.message
            );
            None
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn create_account(key in hostile_text(), account in hostile_text(), limit in hostile_text(), metadata in hostile_metadata()) {
        let request = pb::CreateAccountRequest { idempotency_key: key, account_id: account, overdraft_limit: limit, metadata };
        if let Some(command) = check(CreateAccount::try_from(request), &["idempotency_key", "account_id", "overdraft_limit", "metadata"]) {
            prop_assert!(!command.overdraft_limit.is_negative());
        }
    }

    #[test]
    fn update_account(key in hostile_text(), account in hostile_text(), limit in prop::option::of(hostile_text()), metadata in hostile_metadata(), replace in any::<bool>()) {
        let request = pb::UpdateAccountRequest { idempotency_key: key, account_id: account, overdraft_limit: limit, metadata, replace_metadata: replace, ..Default::default() };
        if let Some(command) = check(UpdateAccount::try_from(&request), &["idempotency_key", "account_id", "overdraft_limit", "metadata"]) {
            prop_assert!(command.overdraft_limit.is_none_or(|l| !l.is_negative()));
        }
    }

    #[test]
    fn issue_grant(
        key in hostile_text(), account in hostile_text(), grant in hostile_text(), amount in hostile_text(),
        source in any::<i32>(), priority in prop::option::of(any::<u32>()),
        effective in hostile_timestamp(), expires in hostile_timestamp(),
        features in prop::collection::vec(hostile_text(), 0..5), external in hostile_text(),
        memo in hostile_text(), metadata in hostile_metadata(),
    ) {
        let request = pb::IssueGrantRequest {
            idempotency_key: key, account_id: account, grant_id: grant, amount, source, priority,
            effective_at: effective, expires_at: expires,
            scope: Some(pb::Scope { features }), external_ref: external, memo, metadata,
            ..Default::default()
        };
        let fields = ["idempotency_key", "account_id", "grant_id", "amount", "source", "priority", "effective_at", "expires_at", "scope", "cost_basis", "external_ref", "memo", "metadata"];
        if let Some(command) = check(IssueGrant::try_from(request), &fields) {
            prop_assert!(command.terms.amount.is_positive());
            if let (Some(from), Some(until)) = (command.terms.effective_at, command.terms.expires_at) {
                prop_assert!(from < until);
            }
        }
    }

    #[test]
    fn close_grant(key in hostile_text(), account in hostile_text(), grant in hostile_text(), memo in hostile_text()) {
        let void = pb::VoidGrantRequest { idempotency_key: key.clone(), account_id: account.clone(), grant_id: grant.clone(), memo: memo.clone() };
        check(CloseGrant::try_from(void), &["idempotency_key", "account_id", "grant_id", "memo"]);
        let expire = pb::ExpireGrantRequest { idempotency_key: key, account_id: account, grant_id: grant, memo };
        check(CloseGrant::try_from(expire), &["idempotency_key", "account_id", "grant_id", "memo"]);
    }

    #[test]
    fn refund(key in hostile_text(), account in hostile_text(), debit in hostile_text(), amount in hostile_text(), grant in hostile_text(), expires in hostile_timestamp(), memo in hostile_text()) {
        let request = pb::RefundRequest { idempotency_key: key, account_id: account, debit_id: debit, amount, refund_grant_id: grant, refund_grant_expires_at: expires, memo };
        if let Some(command) = check(Refund::try_from(request), &["idempotency_key", "account_id", "debit_id", "amount", "refund_grant_id", "refund_grant_expires_at", "memo"]) {
            prop_assert!(command.amount.is_positive());
        }
    }

    #[test]
    fn adjust(key in hostile_text(), account in hostile_text(), amount in hostile_text(), grant in hostile_text(), memo in hostile_text()) {
        let request = pb::AdjustRequest { idempotency_key: key, account_id: account, amount, grant_id: grant, memo, beyond_overdraft: false };
        if let Some(command) = check(Adjust::try_from(request), &["idempotency_key", "account_id", "amount", "grant_id", "memo"]) {
            prop_assert!(!command.amount.is_zero());
        }
    }

    #[test]
    fn list_queries(account in hostile_text(), kinds in prop::collection::vec(any::<i32>(), 0..6), grant in hostile_text(), debit in hostile_text(), from in hostile_timestamp(), until in hostile_timestamp(), size in any::<u32>(), token in hostile_text(), open in any::<bool>()) {
        let entries = pb::ListEntriesRequest { account_id: account.clone(), kinds, grant_id: grant, debit_id: debit, from, until, page_size: size, page_token: token.clone() };
        check(EntryQuery::try_from(entries), &["account_id", "kinds", "grant_id", "debit_id", "from", "until", "page_size", "page_token"]);
        let grants = pb::ListGrantsRequest { account_id: account, open_only: open, page_size: size, page_token: token };
        check(GrantQuery::try_from(grants), &["account_id", "page_size", "page_token"]);
    }

    /// A valid request cut anywhere on the wire decodes to an error or to a shorter message;
    /// either way the conversion behind it holds.
    #[test]
    fn truncated_messages(cut in any::<usize>(), garbage in prop::collection::vec(any::<u8>(), 0..64)) {
        let request = pb::IssueGrantRequest {
            idempotency_key: "k-1".into(), account_id: "acme".into(), grant_id: "g1".into(),
            amount: "12.5".into(), source: pb::GrantSource::Purchase.into(),
            memo: "a purchase".into(),
            metadata: [("plan".to_owned(), "pro".to_owned())].into(),
            ..Default::default()
        };
        let bytes = request.encode_to_vec();
        let mut cut_bytes = bytes[..cut % (bytes.len() + 1)].to_vec();
        if let Ok(decoded) = pb::IssueGrantRequest::decode(cut_bytes.as_slice()) {
            check(IssueGrant::try_from(decoded), &["idempotency_key", "account_id", "grant_id", "amount", "source", "priority", "effective_at", "expires_at", "scope", "cost_basis", "external_ref", "memo", "metadata"]);
        }
        cut_bytes.extend(garbage);
        if let Ok(decoded) = pb::IssueGrantRequest::decode(cut_bytes.as_slice()) {
            check(IssueGrant::try_from(decoded), &["idempotency_key", "account_id", "grant_id", "amount", "source", "priority", "effective_at", "expires_at", "scope", "cost_basis", "external_ref", "memo", "metadata"]);
        }
    }
}
