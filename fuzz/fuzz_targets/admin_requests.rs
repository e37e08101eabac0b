//! Bytes off the wire into every Admin request conversion of `tollgate-proto`: the first byte
//! picks the request type, the rest is decoded by prost and converted with the crate's own
//! `TryFrom`.
//!
//! A conversion either succeeds with values inside the core's bounds (amounts that re-format
//! and re-parse to themselves, timestamps that encode and decode to themselves, ids, memos and
//! metadata exactly as sent) or fails with gRPC `INVALID_ARGUMENT` and a message
//! `"<field>: <problem>"` whose field is one of that request's (judged against the contract's
//! descriptors); it gives the same answer twice, and never panics.

#![no_main]

use std::collections::{BTreeMap, HashMap};

use libfuzzer_sys::fuzz_target;
use prost::Message;
use tollgate_core::command::{
    Adjust, CloseGrant, CreateAccount, IssueGrant, Memo, Metadata, Refund, UpdateAccount,
    MEMO_LEN_MAX, METADATA_BYTES_MAX, METADATA_ENTRIES_MAX, METADATA_KEY_LEN_MAX,
};
use tollgate_core::grant::SCOPE_FEATURES_MAX;
use tollgate_core::{Credits, Scope, Timestamp};
use tollgate_fuzz::contract::assert_names_field;
use tollgate_fuzz::ADMIN_REQUESTS;
use tollgate_proto::decode::{self, EntryQuery, GrantQuery, FILTER_KINDS_MAX, PAGE_TOKEN_LEN_MAX};
use tollgate_proto::{pb, ServiceError};

fuzz_target!(|data: &[u8]| {
    let Some((&pick, bytes)) = data.split_first() else {
        return;
    };
    match ADMIN_REQUESTS[usize::from(pick) % ADMIN_REQUESTS.len()] {
        "CreateAccountRequest" => create_account(bytes),
        "UpdateAccountRequest" => update_account(bytes),
        "IssueGrantRequest" => issue_grant(bytes),
        "VoidGrantRequest" => void_grant(bytes),
        "ExpireGrantRequest" => expire_grant(bytes),
        "RefundRequest" => refund(bytes),
        "AdjustRequest" => adjust(bytes),
        "ListEntriesRequest" => list_entries(bytes),
        "ListGrantsRequest" => list_grants(bytes),
        other => unreachable!("no conversion for {other}"),
    }
});

/// Decodes `bytes` as `R` and converts it twice; a refusal must name a field of `name`.
fn convert<R, T>(
    name: &str,
    bytes: &[u8],
    conversion: fn(R) -> Result<T, ServiceError>,
) -> Option<(R, T)>
where
    R: Message + Default + Clone,
    T: PartialEq + std::fmt::Debug,
{
    let request = R::decode(bytes).ok()?;
    let result = conversion(request.clone());
    assert_eq!(result, conversion(request.clone()), "{name}: two answers");
    match result {
        Ok(value) => Some((request, value)),
        Err(error) => {
            let status = tonic::Status::from(error);
            assert_names_field(name, status.code(), status.message());
            None
        }
    }
}

fn create_account(bytes: &[u8]) {
    let Some((request, command)) = convert::<pb::CreateAccountRequest, _>(
        "CreateAccountRequest",
        bytes,
        CreateAccount::try_from,
    ) else {
        return;
    };
    assert_eq!(command.key.as_str(), request.idempotency_key);
    assert_eq!(command.account.as_str(), request.account_id);
    assert!(!command.overdraft_limit.is_negative());
    assert_credits(command.overdraft_limit, &request.overdraft_limit);
    assert_metadata(&command.metadata, &request.metadata);
}

fn update_account(bytes: &[u8]) {
    let Some((request, command)) = convert::<pb::UpdateAccountRequest, _>(
        "UpdateAccountRequest",
        bytes,
        |r: pb::UpdateAccountRequest| UpdateAccount::try_from(&r),
    ) else {
        return;
    };
    assert_eq!(command.key.as_str(), request.idempotency_key);
    assert_eq!(command.account.as_str(), request.account_id);
    assert_eq!(
        command.overdraft_limit.is_some(),
        request.overdraft_limit.is_some()
    );
    if let (Some(limit), Some(text)) = (command.overdraft_limit, &request.overdraft_limit) {
        assert!(!limit.is_negative());
        assert_credits(limit, text);
    }
    assert_metadata(&command.metadata, &request.metadata);
    assert_eq!(command.replace_metadata, request.replace_metadata);
}

fn issue_grant(bytes: &[u8]) {
    let Some((request, command)) =
        convert::<pb::IssueGrantRequest, _>("IssueGrantRequest", bytes, IssueGrant::try_from)
    else {
        return;
    };
    let terms = &command.terms;
    assert_eq!(command.key.as_str(), request.idempotency_key);
    assert_eq!(command.account.as_str(), request.account_id);
    assert_eq!(terms.id.as_str(), request.grant_id);
    assert!(terms.amount.is_positive());
    assert_credits(terms.amount, &request.amount);
    assert_eq!(terms.priority, request.priority);
    assert_timestamp(terms.effective_at, request.effective_at.as_ref());
    assert_timestamp(terms.expires_at, request.expires_at.as_ref());
    match &terms.scope {
        Scope::All => assert!(request.scope.as_ref().is_none_or(|s| s.features.is_empty())),
        Scope::Features(features) => {
            assert!(!features.is_empty() && features.len() <= SCOPE_FEATURES_MAX);
        }
    }
    if let Some(money) = terms.cost_basis {
        assert!(!money.amount.is_sign_negative());
    }
    assert_eq!(
        terms.external_ref.clone().unwrap_or_default(),
        request.external_ref
    );
    assert_metadata(&command.metadata, &request.metadata);
    assert_memo(&command.memo, &request.memo);
    // The grant these terms give is one the core accepts: issued when it takes effect, or at
    // the epoch when no start is given and its expiry (if any) is after that.
    let issued_at = terms.effective_at.unwrap_or(Timestamp::EPOCH);
    if terms
        .expires_at
        .is_none_or(|expires_at| expires_at > issued_at)
    {
        let grant = terms.grant_at(issued_at);
        assert_eq!(grant.validate(), Ok(()), "{request:?}");
    } else {
        assert!(
            terms.effective_at.is_none(),
            "expiry not after the start: {request:?}"
        );
    }
}

fn void_grant(bytes: &[u8]) {
    if let Some((request, command)) =
        convert::<pb::VoidGrantRequest, _>("VoidGrantRequest", bytes, CloseGrant::try_from)
    {
        close(
            &command,
            &request.account_id,
            &request.grant_id,
            &request.memo,
        );
    }
}

fn expire_grant(bytes: &[u8]) {
    if let Some((request, command)) =
        convert::<pb::ExpireGrantRequest, _>("ExpireGrantRequest", bytes, CloseGrant::try_from)
    {
        close(
            &command,
            &request.account_id,
            &request.grant_id,
            &request.memo,
        );
    }
}

fn close(command: &CloseGrant, account: &str, grant: &str, memo: &str) {
    assert_eq!(command.account.as_str(), account);
    assert_eq!(command.grant.as_str(), grant);
    assert_memo(&command.memo, memo);
}

fn refund(bytes: &[u8]) {
    let Some((request, command)) =
        convert::<pb::RefundRequest, _>("RefundRequest", bytes, Refund::try_from)
    else {
        return;
    };
    assert_eq!(command.account.as_str(), request.account_id);
    assert_eq!(command.debit.as_str(), request.debit_id);
    assert!(command.amount.is_positive());
    assert_credits(command.amount, &request.amount);
    assert_eq!(
        command
            .refund_grant_id
            .as_ref()
            .map(|id| id.as_str())
            .unwrap_or_default(),
        request.refund_grant_id
    );
    assert_timestamp(
        command.refund_grant_expires_at,
        request.refund_grant_expires_at.as_ref(),
    );
    assert_memo(&command.memo, &request.memo);
}

fn adjust(bytes: &[u8]) {
    let Some((request, command)) =
        convert::<pb::AdjustRequest, _>("AdjustRequest", bytes, Adjust::try_from)
    else {
        return;
    };
    assert_eq!(command.account.as_str(), request.account_id);
    assert!(!command.amount.is_zero());
    assert_credits(command.amount, &request.amount);
    assert!(!command.memo.is_empty());
    assert_memo(&command.memo, &request.memo);
}

fn list_entries(bytes: &[u8]) {
    let Some((request, query)) =
        convert::<pb::ListEntriesRequest, _>("ListEntriesRequest", bytes, EntryQuery::try_from)
    else {
        return;
    };
    assert_eq!(query.account.as_str(), request.account_id);
    assert!(query.kinds.len() <= FILTER_KINDS_MAX);
    assert_eq!(query.kinds.len(), request.kinds.len());
    for (kind, sent) in query.kinds.iter().zip(&request.kinds) {
        assert_eq!(decode::entry_kind_to_pb(*kind) as i32, *sent);
    }
    assert_timestamp(query.from, request.from.as_ref());
    assert_timestamp(query.until, request.until.as_ref());
    assert_page_token(query.page_token.as_deref(), &request.page_token);
}

fn list_grants(bytes: &[u8]) {
    let Some((request, query)) =
        convert::<pb::ListGrantsRequest, _>("ListGrantsRequest", bytes, GrantQuery::try_from)
    else {
        return;
    };
    assert_eq!(query.account.as_str(), request.account_id);
    assert_eq!(query.open_only, request.open_only);
    assert_page_token(query.page_token.as_deref(), &request.page_token);
}

// ---- What every accepted field must satisfy ---------------------------------------------------

/// An accepted amount is the sent text's value, and formats to a text that reads back the same.
fn assert_credits(amount: Credits, sent: &str) {
    let shown = amount.to_string();
    assert_eq!(
        Credits::parse(&shown),
        Ok(amount),
        "{sent:?} shows as {shown:?}"
    );
    if !sent.is_empty() {
        assert_eq!(Credits::parse(sent), Ok(amount), "{sent:?}");
    }
}

/// An accepted timestamp is in the core's range, is the sent instant with sub-milliseconds
/// dropped toward the past, and encodes and decodes to itself.
fn assert_timestamp(at: Option<Timestamp>, sent: Option<&prost_types::Timestamp>) {
    assert_eq!(at.is_some(), sent.is_some());
    let (Some(at), Some(sent)) = (at, sent) else {
        return;
    };
    assert!(Timestamp::from_millis(at.millis()).is_ok(), "{at:?}");
    assert_eq!(
        i128::from(at.millis()),
        i128::from(sent.seconds) * 1_000 + i128::from(sent.nanos / 1_000_000),
        "{sent:?}"
    );
    let encoded = decode::timestamp_to_pb(at);
    assert_eq!(decode::timestamp("t", &encoded), Ok(at), "{encoded:?}");
}

fn assert_metadata(metadata: &Metadata, sent: &HashMap<String, String>) {
    let entries = metadata.entries();
    assert_eq!(
        entries,
        &sent.clone().into_iter().collect::<BTreeMap<_, _>>()
    );
    assert!(entries.len() <= METADATA_ENTRIES_MAX);
    let bytes: usize = entries.iter().map(|(k, v)| k.len() + v.len()).sum();
    assert!(bytes <= METADATA_BYTES_MAX);
    for key in entries.keys() {
        assert!(
            !key.is_empty() && key.len() <= METADATA_KEY_LEN_MAX,
            "{key:?}"
        );
    }
}

fn assert_memo(memo: &Memo, sent: &str) {
    assert_eq!(memo.as_str(), sent);
    assert!(memo.as_str().len() <= MEMO_LEN_MAX);
    assert!(!memo.as_str().chars().any(char::is_control), "{sent:?}");
}

fn assert_page_token(token: Option<&str>, sent: &str) {
    assert_eq!(token.unwrap_or_default(), sent);
    assert!(sent.len() <= PAGE_TOKEN_LEN_MAX);
}
