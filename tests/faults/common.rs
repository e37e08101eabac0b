//! What every fault test starts from: one account, `acme`, with no overdraft and one purchased
//! grant, `bought`, of 1,000 credits.

use tollgate_core::command::{CreateAccount, GrantTerms, IssueGrant, Memo, Metadata};
use tollgate_core::{AccountId, Credits, GrantId, GrantSource, IdempotencyKey, Scope, Timestamp};
use tollgate_ledger::LedgerStore;

pub const GRANTED_CREDITS: i64 = 1_000;

pub fn acct() -> AccountId {
    AccountId::new("acme").unwrap()
}

/// Opens `acme` and grants it `GRANTED_CREDITS`.
pub async fn open_account<L: LedgerStore + ?Sized>(ledger: &L, now: Timestamp) {
    ledger
        .create_account(
            CreateAccount {
                key: IdempotencyKey::new("create").unwrap(),
                account: acct(),
                overdraft_limit: Credits::ZERO,
                metadata: Metadata::default(),
            },
            now,
        )
        .await
        .unwrap();
    ledger
        .issue_grant(
            IssueGrant {
                key: IdempotencyKey::new("grant").unwrap(),
                account: acct(),
                terms: GrantTerms {
                    id: GrantId::new("bought").unwrap(),
                    amount: Credits::from_whole(GRANTED_CREDITS).unwrap(),
                    source: GrantSource::Purchase,
                    priority: None,
                    effective_at: None,
                    expires_at: None,
                    scope: Scope::All,
                    cost_basis: None,
                    external_ref: None,
                },
                metadata: Metadata::default(),
                memo: Memo::default(),
            },
            now,
        )
        .await
        .unwrap()
        .unwrap();
}
