//! Setup shared by the edge's tests: a published price book and a funded account.

#![allow(dead_code)]

pub mod faulty;

use tollgate_core::{
    AccountId, Credits, FeatureKey, IdempotencyKey, PriceBook, PriceBookVersion, Quantity, Rate,
    Timestamp,
};
use tollgate_edge::{Clock, DebitRequest, EdgeSettings, Engine, Spend, SystemClock};
use tollgate_region::conformance::{install, segment};
use tollgate_region::{AccountSummary, EnforcementMode, RegionStore};

pub fn credits(text: &str) -> Credits {
    Credits::parse(text).unwrap()
}

/// A debit of `units` of feature `gen` under `key`, in the account's own mode.
pub fn debit_gen(account: &AccountId, key: &str, units: &str) -> DebitRequest {
    DebitRequest {
        account: account.clone(),
        key: IdempotencyKey::new(key).unwrap(),
        feature: feature("gen"),
        spend: Spend::Quantity(Quantity::parse(units).unwrap()),
        actor: None,
        mode: None,
        event_time: None,
    }
}

/// An edge engine on `store` with the region's published price book loaded.
pub async fn priced_engine<S: RegionStore>(
    store: std::sync::Arc<S>,
    settings: EdgeSettings,
    clock: std::sync::Arc<dyn Clock>,
) -> Engine<S> {
    let engine = Engine::new(std::sync::Arc::clone(&store), settings, clock);
    engine
        .catalogue()
        .reload_prices(store.as_ref())
        .await
        .unwrap();
    engine
}

pub fn feature(name: &str) -> FeatureKey {
    FeatureKey::new(name).unwrap()
}

pub fn now() -> Timestamp {
    SystemClock.now()
}

/// `gen` at `rate` credits per unit, `lookup` and `api_call` at 1.
pub fn book(version: u64, rate: &str) -> PriceBook {
    PriceBook::new(vec![PriceBookVersion {
        version,
        effective_from: Timestamp::EPOCH,
        default: [
            (feature("gen"), Rate::parse(rate).unwrap()),
            (feature("lookup"), Rate::parse("1").unwrap()),
            (feature("api_call"), Rate::parse("1").unwrap()),
        ]
        .into(),
        ..PriceBookVersion::default()
    }])
}

/// Publishes the price book (version 1, `gen` at 0.5) unless one is there, and an account with
/// `amount` credits in one segment, as the authority would.
pub async fn seed<S: RegionStore>(
    store: &S,
    account: &str,
    amount: &str,
    mode: EnforcementMode,
) -> AccountId {
    let a = AccountId::new(account).unwrap();
    if store.load_price_book().await.unwrap().is_none() {
        store.publish_price_book(&book(1, "0.5")).await.unwrap();
    }
    let mut spec = segment("g1", amount, 50, None);
    spec.effective_at = Timestamp::EPOCH;
    install(store, &a, spec).await;
    store
        .publish_account(&AccountSummary {
            account: a.clone(),
            created_at: Timestamp::EPOCH,
            plan: None,
            mode,
            contracts: Vec::new(),
            balance: credits(amount),
            overdraft_limit: Credits::ZERO,
            rate_limited: Default::default(),
            published_at: now(),
            outside: Vec::new(),
            debt_basis: Credits::ZERO,
            region_moves: 0,
        })
        .await
        .unwrap();
    a
}

/// Waits (bounded) until the edge holds a lease on the account: the first cached decision on a
/// cold account is strict, and the lease arrives in the background.
pub async fn wait_for_lease<S: RegionStore>(
    engine: &tollgate_edge::Engine<S>,
    account: &AccountId,
) {
    for _ in 0..2_000 {
        if engine.leases().holds(account) {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
    }
    panic!("no lease on {account} after 2 s");
}
