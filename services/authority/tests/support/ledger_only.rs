//! A correction written into the embedded node's ledger file directly, bypassing the authority
//! (as a hand-run script or a restore would): the regions are not told, so what they still hold
//! of the account is spent there and parked when reconciled. Every Admin call takes credits
//! back from the regions first; this is how a test makes the ledger and a region disagree.

use std::path::Path;

use tollgate_core::command::{Adjust, Memo};
use tollgate_core::{AccountId, Credits, IdempotencyKey, Timestamp};
use tollgate_ledger::{LedgerStore, SqliteLedger};

/// Takes `amount` credits away from `account` in the ledger under `data` (the node's data
/// directory) only.
pub async fn take_away(data: &Path, account: &str, amount: &str, key: &str) {
    let ledger = SqliteLedger::open(&data.join("ledger.db")).await.unwrap();
    let amount: Credits = amount.parse().unwrap();
    let now = Timestamp::from_millis(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64,
    )
    .unwrap();
    ledger
        .adjust(
            Adjust {
                key: IdempotencyKey::new(key).unwrap(),
                account: AccountId::new(account).unwrap(),
                amount: amount.checked_neg().unwrap(),
                grant_id: None,
                memo: Memo::new("taken away in the ledger only").unwrap(),
                beyond_overdraft: true,
                out: Default::default(),
            },
            now,
        )
        .await
        .unwrap()
        .unwrap();
}
