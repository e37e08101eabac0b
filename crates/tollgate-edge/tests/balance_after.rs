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
