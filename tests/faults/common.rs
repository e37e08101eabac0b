//! What every fault test starts from: one account, `acme`, with no overdraft and one purchased
//! grant, `bought`, of 1,000 credits.

use tollgate_core::command::{CreateAccount, GrantTerms, IssueGrant, Memo, Metadata};
use tollgate_core::{AccountId, Credits, GrantId, GrantSource, IdempotencyKey, Timestamp};
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
                terms: GrantTerms::new(
                    GrantId::new("bought").unwrap(),
                    Credits::from_whole(GRANTED_CREDITS).unwrap(),
                    GrantSource::Purchase,
                ),
                metadata: Metadata::default(),
                memo: Memo::default(),
            },
            now,
        )
        .await
        .unwrap()
        .unwrap();
}
