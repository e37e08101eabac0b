//! The balance a Debit reply carries (docs/answer.md, "The balance a caller sees"): a strict
//! reply counts the region's pool and this edge's lease; a cached reply, made without a call to
//! the region, counts the region as this edge last read it less its own decisions since.

mod common;

use std::sync::Arc;

use common::{credits, seed, wait_for_lease};

use tollgate_core::{AccountId, RegionId};
use tollgate_edge::{Clock, DebitRequest, Debited, Decision, EdgeSettings, Engine, SystemClock};
use tollgate_region::{EnforcementMode, MemoryRegionStore, RegionStore};

fn settings() -> EdgeSettings {
    let mut settings = EdgeSettings::new(RegionId::new("eu").unwrap());
    settings.lease_credits = credits("10");
    settings
}

fn debit(account: &AccountId, key: &str, units: &str, mode: EnforcementMode) -> DebitRequest {
    DebitRequest {
        mode: Some(mode),
        ..common::debit_gen(account, key, units)
    }
}

async fn done<S: RegionStore>(engine: &Engine<S>, request: DebitRequest) -> Debited {
    match engine.debit(request).await.unwrap() {
        Decision::Done(done) => done,
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn a_reply_counts_the_region_and_the_lease_not_the_lease_alone() {
    let store = Arc::new(MemoryRegionStore::default());
    // 100 credits; `gen` costs 0.5 a unit.
    let a = seed(
        store.as_ref(),
        "acct-balance",
        "100",
        EnforcementMode::Cached,
    )
    .await;
    let edge = common::priced_engine(Arc::clone(&store), settings(), Arc::new(SystemClock)).await;

    // The edge holds a lease of 10; a strict decision counts the pool (89) and the lease.
    edge.leases().warm(&a);
    wait_for_lease(&edge, &a).await;
    let first = done(&edge, debit(&a, "first", "2", EnforcementMode::Strict)).await;
    assert_eq!(first.mode, EnforcementMode::Strict);
    assert_eq!(first.balance_after, credits("99"));

    // From the lease: 97, not what the lease alone holds.
    let cached = done(&edge, debit(&a, "cached", "4", EnforcementMode::Cached)).await;
    assert_eq!(cached.mode, EnforcementMode::Cached);
    assert!(edge.leases().available(&a, None, SystemClock.now()) < credits("10"));
    assert_eq!(cached.balance_after, credits("97"));

    // Strict again: 96.
    let strict = done(&edge, debit(&a, "strict", "2", EnforcementMode::Strict)).await;
    assert_eq!(strict.mode, EnforcementMode::Strict);
    assert_eq!(strict.balance_after, credits("96"));

    // And the next cached reply goes on from there: 95.
    let again = done(&edge, debit(&a, "again", "2", EnforcementMode::Cached)).await;
    assert_eq!(again.mode, EnforcementMode::Cached);
    assert_eq!(again.balance_after, credits("95"));
}

/// The authority moves credits into the region, then publishes the region's summary without
/// them outside. An edge still holding the summary from before (its change notice not read
/// yet) would count the moved credits twice, in the region and outside it: a decision and a
/// view say the region's move count, and the edge reads the summary published with it.
#[tokio::test]
async fn credits_moved_into_the_region_are_counted_once() {
    let store = Arc::new(MemoryRegionStore::default());
    let a = seed(store.as_ref(), "acct-moved", "100", EnforcementMode::Strict).await;
    // 50 more credits the authority holds outside the region.
    let mut summary = store.account_summary(&a).await.unwrap().unwrap();
    let outside = |amount: &str| tollgate_region::OutsideCredits {
        amount: credits(amount),
        effective_at: tollgate_core::Timestamp::EPOCH,
        expires_at: None,
        scope: tollgate_core::Scope::All,
    };
    summary.outside = vec![outside("50")];
    store.publish_account(&summary).await.unwrap();
    // No watcher: the edge reads change notices only when started.
    let edge = common::priced_engine(Arc::clone(&store), settings(), Arc::new(SystemClock)).await;
    let first = done(&edge, debit(&a, "first", "2", EnforcementMode::Strict)).await;
    assert_eq!(first.balance_after, credits("149"));

    // The authority moves 30 of the 50 into the region and publishes the summary with 20
    // outside; the edge's summary in memory still says 50.
    let mut moved = tollgate_region::conformance::segment("g2", "30", 50, None);
    moved.effective_at = tollgate_core::Timestamp::EPOCH;
    tollgate_region::conformance::install(store.as_ref(), &a, moved).await;
    summary.outside = vec![outside("20")];
    store.publish_account(&summary).await.unwrap();
    let second = done(&edge, debit(&a, "second", "2", EnforcementMode::Strict)).await;
    assert_eq!(second.balance_after, credits("148"), "not 178");

    // The same for a read of the balance: 10 more moved in, 10 left outside.
    let mut moved = tollgate_region::conformance::segment("g3", "10", 50, None);
    moved.effective_at = tollgate_core::Timestamp::EPOCH;
    tollgate_region::conformance::install(store.as_ref(), &a, moved).await;
    summary.outside = vec![outside("10")];
    store.publish_account(&summary).await.unwrap();
    match edge.balance(a.clone(), None).await.unwrap() {
        Decision::Done(view) => assert_eq!(view.balance, credits("148"), "not 158"),
        other => panic!("{other:?}"),
    }

    // Moved and not published yet: the balance is off by what moved until the summary comes,
    // and the miss is counted.
    let mut moved = tollgate_region::conformance::segment("g4", "5", 50, None);
    moved.effective_at = tollgate_core::Timestamp::EPOCH;
    tollgate_region::conformance::install(store.as_ref(), &a, moved).await;
    let early = done(&edge, debit(&a, "early", "2", EnforcementMode::Strict)).await;
    assert_eq!(early.balance_after, credits("152"));
    let behind = |edge: &Engine<MemoryRegionStore>| {
        edge.leases()
            .stats()
            .summary_behind
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    assert_eq!(behind(&edge), 1);
    summary.outside = vec![outside("5")];
    store.publish_account(&summary).await.unwrap();
    // The count found behind is read again after a pause, not on every decision.
    tokio::time::sleep(std::time::Duration::from_millis(
        u64::try_from(tollgate_edge::SUMMARY_REREAD_MS).unwrap() + 10,
    ))
    .await;
    let late = done(&edge, debit(&a, "late", "2", EnforcementMode::Strict)).await;
    assert_eq!(late.balance_after, credits("146"));
    assert_eq!(behind(&edge), 1);
}
