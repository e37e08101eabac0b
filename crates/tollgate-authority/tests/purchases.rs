//! Purchases on a real (SQLite) ledger: exactly once per payment reference, also after the
//! idempotency record of the first purchase has been forgotten.

use tollgate_authority::purchases::{
    purchase, refund_purchase, PurchaseError, PurchaseOrder, RefundOrder,
};
use tollgate_authority::LedgerCloser;
use tollgate_core::command::{CreateAccount, Memo, Metadata};
use tollgate_core::{AccountId, Credits, Currency, IdempotencyKey, Money, Scope, Timestamp};
use tollgate_ledger::{LedgerStore, SqliteLedger};

fn order(account: &AccountId, credits: i64) -> PurchaseOrder {
    PurchaseOrder {
        account: account.clone(),
        credits: Credits::from_whole(credits).unwrap(),
        money: Money {
            amount: "12.00".parse().unwrap(),
            currency: Currency::new("USD").unwrap(),
        },
        payment_reference: "ch_retained_1".to_owned(),
        priority: None,
        expires_at: None,
        scope: Scope::All,
        metadata: Metadata::default(),
        memo: Memo::default(),
    }
}

#[tokio::test]
async fn a_purchase_is_granted_once_even_after_its_idempotency_record_is_forgotten() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = SqliteLedger::open(&dir.path().join("ledger.db"))
        .await
        .unwrap();
    let now = Timestamp::from_millis(1_700_000_000_000).unwrap();
    let account = AccountId::new("acme").unwrap();
    ledger
        .create_account(
            CreateAccount {
                key: IdempotencyKey::new("a1").unwrap(),
                account: account.clone(),
                overdraft_limit: Credits::ZERO,
                metadata: Metadata::default(),
            },
            now,
        )
        .await
        .unwrap();

    let first = purchase(&ledger, &order(&account, 30), now).await.unwrap();
    let receipt = first.outcome.unwrap();
    assert!(!receipt.replayed);
    let grant = first.grant.unwrap();
    assert_eq!(grant.grant.external_ref.as_deref(), Some("ch_retained_1"));

    // Forget every idempotency record (as the retention does after 30 days).
    let later = Timestamp::from_millis(now.millis() + 1).unwrap();
    assert!(ledger.prune_idempotency(later, 100).await.unwrap() >= 1);

    let retried = purchase(&ledger, &order(&account, 30), later)
        .await
        .unwrap();
    let replay = retried.outcome.unwrap();
    assert!(replay.replayed);
    assert!(replay.movements.is_empty());
    assert_eq!(replay.grant_id, Some(grant.grant.id.clone()));
    assert_eq!(
        ledger.account(&account).await.unwrap().balance,
        Credits::from_whole(30).unwrap()
    );
    let conflict = purchase(&ledger, &order(&account, 31), later).await;
    assert!(
        matches!(conflict, Err(PurchaseError::ReferenceConflict { .. })),
        "{conflict:?}"
    );

    // Nothing used: the whole price is due back.
    let refunded = refund_purchase(
        &ledger,
        &LedgerCloser(&ledger),
        RefundOrder {
            key: IdempotencyKey::new("r1").unwrap(),
            account: account.clone(),
            grant: grant.grant.id.clone(),
            memo: Memo::default(),
        },
        later,
    )
    .await
    .unwrap();
    assert_eq!(refunded.credits_voided, Credits::from_whole(30).unwrap());
    assert_eq!(refunded.money_due.unwrap().amount.to_string(), "12.00");
    assert_eq!(
        ledger.account(&account).await.unwrap().balance,
        Credits::ZERO
    );
    let report = ledger.verify(Some(&account)).await.unwrap();
    assert!(report.problems.is_empty(), "{report:?}");
}
