//! What every fault test starts from: one account, `acme`, with no overdraft and one purchased
//! grant, `bought`, of 1,000 credits; the edge processes' tests also price the feature `gen`.

use tollgate_authority::{Authority, Feature};
use tollgate_core::command::{CreateAccount, GrantTerms, IssueGrant, Memo, Metadata};
use tollgate_core::{
    AccountId, Credits, FeatureKey, GrantId, GrantSource, IdempotencyKey, PriceBookVersion, Rate,
    Timestamp,
};
use tollgate_ledger::LedgerStore;
use tollgate_region::RegionStore;

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

/// Defines the feature `gen` (unit `call`) and prices it at 0.01 credits a call from the epoch.
#[allow(dead_code)] // the authority's fault tests send explicit costs
pub async fn price_gen<L: LedgerStore + ?Sized, R: RegionStore>(node: &Authority<L, R>) {
    node.define_feature(&Feature {
        feature: FeatureKey::new("gen").unwrap(),
        unit: "call".into(),
        description: String::new(),
    })
    .await
    .unwrap();
    node.publish_price_version(&PriceBookVersion {
        version: 1,
        effective_from: Timestamp::EPOCH,
        default: [(
            FeatureKey::new("gen").unwrap(),
            Rate::parse("0.01").unwrap(),
        )]
        .into(),
        ..PriceBookVersion::default()
    })
    .await
    .unwrap();
}

/// The ledger's debits of `acme` by debit id.
pub async fn ledger_debits<L: LedgerStore + ?Sized>(
    ledger: &L,
) -> std::collections::BTreeMap<String, i64> {
    let mut filter = tollgate_ledger::EntryFilter::account(acct());
    filter.kinds = vec![tollgate_core::EntryKind::Debit];
    let mut page = tollgate_ledger::PageRequest {
        size: 1_000,
        token: None,
    };
    let mut debits = std::collections::BTreeMap::new();
    loop {
        let found = ledger.entries(&filter, page.clone()).await.unwrap();
        for entry in &found.items {
            *debits
                .entry(entry.debit_id.as_ref().unwrap().to_string())
                .or_insert(0) += entry.amount.micros();
        }
        match found.next_token {
            Some(token) => page.token = Some(token),
            None => return debits,
        }
    }
}
