//! The lifecycle pass with one region not answering: the other region's idle allocations are
//! still taken back and its accounts swept, and the pass says which region it left for later
//! (a pass that stopped at the first failing region held every region back).

#[path = "../../tollgate-edge/tests/common/faulty.rs"]
#[allow(dead_code)]
mod faulty;

use std::collections::BTreeMap;
use std::sync::Arc;

use faulty::FaultyStore;
use tollgate_authority::{Authority, AuthoritySettings, Clock, ManualClock, StateStore};
use tollgate_core::command::{CreateAccount, GrantTerms, IssueGrant, Memo, Metadata};
use tollgate_core::{
    AccountId, Credits, GrantId, GrantSource, IdempotencyKey, RegionId, Timestamp,
};
use tollgate_ledger::{LedgerStore, SqliteLedger};
use tollgate_region::{MemoryRegionStore, RegionStore, RETAIN_MS_DEFAULT};

const MICROS: i64 = 1_000_000;

fn key(text: &str) -> IdempotencyKey {
    IdempotencyKey::new(text).unwrap()
}

#[tokio::test]
async fn a_region_that_does_not_answer_holds_back_no_other_regions_take_back() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = Arc::new(
        SqliteLedger::open(&dir.path().join("ledger.db"))
            .await
            .unwrap(),
    );
    let state_url = format!(
        "sqlite://{}?mode=rwc",
        dir.path().join("state.db").display()
    );
    let state = StateStore::connect(&state_url).await.unwrap();
    let clock = Arc::new(ManualClock::new(
        Timestamp::parse_rfc3339("2026-06-01T00:00:00Z").unwrap(),
    ));
    let (eu, us) = (RegionId::new("eu").unwrap(), RegionId::new("us").unwrap());
    let regions: BTreeMap<RegionId, Arc<FaultyStore<MemoryRegionStore>>> = [&eu, &us]
        .into_iter()
        .map(|r| {
            let store = MemoryRegionStore::new(RETAIN_MS_DEFAULT);
            (r.clone(), Arc::new(FaultyStore::new(store)))
        })
        .collect();
    let settings = AuthoritySettings {
        allocation_micros_min: 40 * MICROS,
        allocation_micros_max: 40 * MICROS,
        idle_ms: 60_000,
        ..AuthoritySettings::default()
    };
    let node = Authority::new(
        Arc::clone(&ledger),
        state,
        regions.clone(),
        clock.clone(),
        settings,
    );
    let account = AccountId::new("acme").unwrap();
    ledger
        .create_account(
            CreateAccount {
                key: key("create"),
                account: account.clone(),
                overdraft_limit: Credits::ZERO,
                metadata: Metadata::default(),
            },
            clock.now(),
        )
        .await
        .unwrap();
    ledger
        .issue_grant(
            IssueGrant {
                key: key("grant"),
                account: account.clone(),
                terms: GrantTerms::new(
                    GrantId::new("bought").unwrap(),
                    Credits::from_micros(100 * MICROS),
                    GrantSource::Purchase,
                ),
                metadata: Metadata::default(),
                memo: Memo::default(),
            },
            clock.now(),
        )
        .await
        .unwrap()
        .unwrap();
    for region in [&eu, &us] {
        node.request_allocation(region, &account, None, Credits::ZERO)
            .await
            .unwrap();
    }
    let pool = |region: &RegionId| {
        let store = Arc::clone(&regions[region]);
        let account = account.clone();
        let now = clock.now();
        async move { store.view(&account, now).await.unwrap().pool() }
    };
    assert_eq!(pool(&us).await, Credits::from_micros(40 * MICROS));

    // Both allocations go idle; eu stops answering.
    clock.advance_ms(120_000);
    regions[&eu].set_down(true);
    let report = node
        .tick()
        .await
        .expect("the pass goes on past a region down");
    assert_eq!(
        report.regions_failed.iter().collect::<Vec<_>>(),
        [&eu],
        "{report:?}"
    );
    assert_eq!(report.allocations_taken_back, 1, "{report:?}");
    assert!(report.accounts_swept >= 1, "{report:?}");
    assert_eq!(
        pool(&us).await,
        Credits::ZERO,
        "us gave its idle credits back"
    );

    // eu answers again: the next pass takes its credits back too.
    regions[&eu].set_down(false);
    let report = node.tick().await.unwrap();
    assert!(report.regions_failed.is_empty(), "{report:?}");
    assert_eq!(report.allocations_taken_back, 1, "{report:?}");
    assert_eq!(pool(&eu).await, Credits::ZERO);
}
