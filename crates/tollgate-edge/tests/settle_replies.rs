//! What an edge does with the region's answer to a settlement of its cached decisions: a reply
//! lost after the region committed, a key reused with a different request, and a balance read
//! while a settlement is on its way. Each runs on the
//! in-memory store and on a redis-server started for the test, behind a wrapper that can lose
//! the next settlement's reply (`common::faulty`).

mod common;

use common::faulty::FaultyStore;
use common::{credits, feature, now, seed, wait_for_lease};

use std::sync::atomic::Ordering;
use std::sync::Arc;

use tollgate_core::{AccountId, Credits, IdempotencyKey, PriceRule, RegionId};
use tollgate_edge::metrics::{Metrics, LEASE_REKEYED_TOTAL};
use tollgate_edge::{DebitRequest, Decision, EdgeSettings, Engine, SystemClock};
use tollgate_region::{
    DebitCommand, DebitOutcome, EnforcementMode, MemoryRegionStore, PriceTag, RedisRegionStore,
    RegionStore, RETAIN_MS_DEFAULT,
};
use tollgate_testkit::RedisServer;

fn settings() -> EdgeSettings {
    let mut settings = EdgeSettings::new(RegionId::new("eu").unwrap());
    settings.lease_credits = credits("10");
    settings
}

fn debit(account: &AccountId, key: &str, units: &str) -> DebitRequest {
    common::debit_gen(account, key, units)
}

/// An edge holding a lease (10 credits) on a fresh cached account funded with 100.
async fn edge_with_lease<S: RegionStore>(
    store: &Arc<FaultyStore<S>>,
    account: &str,
) -> (Engine<FaultyStore<S>>, AccountId) {
    let a = seed(store.as_ref(), account, "100", EnforcementMode::Cached).await;
    store.create_usage_group("audit").await.unwrap();
    let edge = common::priced_engine(Arc::clone(store), settings(), Arc::new(SystemClock)).await;
    edge.leases().warm(&a);
    wait_for_lease(&edge, &a).await;
    (edge, a)
}

async fn cached_debit<S: RegionStore>(edge: &Engine<S>, request: DebitRequest) {
    match edge.debit(request).await.unwrap() {
        Decision::Done(done) => assert_eq!(done.mode, EnforcementMode::Cached),
        other => panic!("expected a cached decision: {other:?}"),
    }
}

/// Every usage record in the stream, as (key, cost).
async fn charged<S: RegionStore>(store: &S) -> Vec<(String, Credits)> {
    let records = store.read_usage("audit", "auditor", 100).await.unwrap();
    records
        .into_iter()
        .map(|r| (r.key.to_string(), r.cost))
        .collect()
}

/// The region commits a settlement but its reply is lost; the edge sends the decisions again.
/// They were charged, so the lease must not get their credits back (a phantom credit the
/// region never gave), and nothing is charged twice.
async fn a_lost_settle_reply_credits_nothing_back<S: RegionStore>(store: Arc<FaultyStore<S>>) {
    let (edge, a) = edge_with_lease(&store, "acct-lost-reply").await;
    cached_debit(&edge, debit(&a, "spend-1", "4")).await;
    cached_debit(&edge, debit(&a, "spend-2", "2")).await;
    let available = edge.leases().available(&a, None, now());
    assert_eq!(available, credits("7"), "10 leased, 2 + 1 spent");

    store.lose_next_reply();
    edge.leases().flush_account(&a).await;
    assert_eq!(edge.leases().pending(), 2, "kept for the next flush");
    edge.leases().flush_account(&a).await;
    assert_eq!(edge.leases().pending(), 0);

    let stats = edge.leases().stats();
    assert_eq!(
        (
            stats.duplicates.load(Ordering::Relaxed),
            stats.lost_entries.load(Ordering::Relaxed)
        ),
        (0, 0),
        "the resent decisions are the ones charged, not duplicates"
    );
    assert_eq!(
        edge.leases().available(&a, None, now()),
        available,
        "no credits come back to the lease"
    );
    assert_eq!(
        charged(store.as_ref()).await,
        [
            ("spend-1".to_string(), credits("2")),
            ("spend-2".to_string(), credits("1"))
        ],
        "each decision charged once"
    );
    edge.shutdown().await;
    let view = store.view(&a, now()).await.unwrap();
    assert_eq!((view.leases, view.pool()), (0, credits("97")));
}

#[tokio::test]
async fn a_lost_settle_reply_credits_nothing_back_in_memory() {
    a_lost_settle_reply_credits_nothing_back(Arc::new(FaultyStore::new(
        MemoryRegionStore::default(),
    )))
    .await;
}

#[tokio::test]
async fn a_lost_settle_reply_credits_nothing_back_on_redis() {
    let server = RedisServer::start().unwrap();
    let store = RedisRegionStore::connect(&server.url(), "tg:lost-reply", RETAIN_MS_DEFAULT)
        .await
        .unwrap();
    a_lost_settle_reply_credits_nothing_back(Arc::new(FaultyStore::new(store))).await;
}

/// A key charged for one request (1 credit, strict) is sent to a cached edge with another body
/// (3 credits): the edge served it, so the region charges it under a derived key, and the edge
/// keeps the credits spent and counts it.
async fn a_reused_key_is_charged_and_counted<S: RegionStore>(store: Arc<FaultyStore<S>>) {
    let (edge, a) = edge_with_lease(&store, "acct-reused-key").await;
    let price = PriceTag::at(1, PriceRule::Default);
    let strict = DebitCommand {
        account: a.clone(),
        key: IdempotencyKey::new("cheap").unwrap(),
        feature: feature("gen"),
        cost: credits("1"),
        now: now(),
        actor: None,
        price,
        forced: false,
    };
    assert!(matches!(
        store.debit(&strict).await.unwrap(),
        DebitOutcome::Allowed(_)
    ));
    cached_debit(&edge, debit(&a, "cheap", "6")).await;
    let available = edge.leases().available(&a, None, now());
    edge.leases().flush_account(&a).await;

    let stats = edge.leases().stats();
    assert_eq!(
        (
            stats.rekeyed.load(Ordering::Relaxed),
            stats.duplicates.load(Ordering::Relaxed)
        ),
        (1, 0)
    );
    assert_eq!(edge.leases().available(&a, None, now()), available);
    let records = charged(store.as_ref()).await;
    assert_eq!(records.len(), 2, "{records:?}");
    assert_eq!(records[0], ("cheap".to_string(), credits("1")));
    assert!(
        records[1].0.starts_with("cheap~") && records[1].1 == credits("3"),
        "the other request is charged under a derived key: {records:?}"
    );
    let text = Metrics::new().unwrap().render(stats, 0, 0);
    assert!(
        text.contains(&format!("{LEASE_REKEYED_TOTAL} 1")),
        "the metric counts it:\n{text}"
    );
    edge.shutdown().await;
    let view = store.view(&a, now()).await.unwrap();
    assert_eq!((view.leases, view.pool()), (0, credits("96")));
}

#[tokio::test]
async fn a_reused_key_is_charged_and_counted_in_memory() {
    a_reused_key_is_charged_and_counted(Arc::new(FaultyStore::new(MemoryRegionStore::default())))
        .await;
}

#[tokio::test]
async fn a_reused_key_is_charged_and_counted_on_redis() {
    let server = RedisServer::start().unwrap();
    let store = RedisRegionStore::connect(&server.url(), "tg:reused-key", RETAIN_MS_DEFAULT)
        .await
        .unwrap();
    a_reused_key_is_charged_and_counted(Arc::new(FaultyStore::new(store))).await;
}

/// A flush takes its batch out of the edge's pending decisions before the region answers; a
/// balance read meanwhile must not see the batch neither pending on the edge nor spent in the
/// region (the account's balance too high by it). The read waits for the settlement instead.
async fn a_balance_read_during_a_flush_counts_its_batch_once<S: RegionStore + 'static>(
    store: Arc<FaultyStore<S>>,
) {
    let (edge, a) = edge_with_lease(&store, "acct-flush-read").await;
    cached_debit(&edge, debit(&a, "spend-1", "4")).await;
    cached_debit(&edge, debit(&a, "spend-2", "2")).await;
    let balance = |edge: Arc<Engine<FaultyStore<S>>>, a: AccountId| async move {
        match edge.balance(a, None).await.unwrap() {
            Decision::Done(view) => view.balance,
            other => panic!("expected a balance: {other:?}"),
        }
    };
    let edge = Arc::new(edge);
    assert_eq!(balance(Arc::clone(&edge), a.clone()).await, credits("97"));

    let held = store.hold_next_settlement();
    let leases = Arc::clone(edge.leases());
    let flushing = {
        let a = a.clone();
        tokio::spawn(async move { leases.flush_account(&a).await })
    };
    held.arrived.notified().await;
    // The batch has left the edge's pending decisions and is not in the region's stream yet.
    let reading = tokio::spawn(balance(Arc::clone(&edge), a.clone()));
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    held.release.notify_one();
    flushing.await.unwrap();
    assert_eq!(
        reading.await.unwrap(),
        credits("97"),
        "100 less 3 spent, once"
    );
    assert_eq!(edge.leases().pending(), 0);
    assert_eq!(balance(Arc::clone(&edge), a).await, credits("97"));
}

#[tokio::test]
async fn a_balance_read_during_a_flush_counts_its_batch_once_in_memory() {
    a_balance_read_during_a_flush_counts_its_batch_once(Arc::new(FaultyStore::new(
        MemoryRegionStore::default(),
    )))
    .await;
}

#[tokio::test]
async fn a_balance_read_during_a_flush_counts_its_batch_once_on_redis() {
    let server = RedisServer::start().unwrap();
    let store = RedisRegionStore::connect(&server.url(), "tg:flush-read", RETAIN_MS_DEFAULT)
        .await
        .unwrap();
    a_balance_read_during_a_flush_counts_its_batch_once(Arc::new(FaultyStore::new(store))).await;
}

/// A reversal flushes the edge's cached decisions first. When that flush does not reach the
/// region, the debit is not recorded there yet: the reversal must say "retry", never "unknown
/// debit" (a client told that would keep a charge it meant to undo). Once the flush goes
/// through, the same reversal refunds it.
async fn a_reversal_before_its_debit_is_flushed_asks_to_retry<S: RegionStore>(
    store: Arc<FaultyStore<S>>,
) {
    let (edge, a) = edge_with_lease(&store, "acct-reverse-unflushed").await;
    cached_debit(&edge, debit(&a, "spend", "4")).await;
    store.fail_settlements(true);
    let reversal = IdempotencyKey::new("undo").unwrap();
    let spend = IdempotencyKey::new("spend").unwrap();
    match edge
        .reverse(a.clone(), reversal.clone(), spend.clone())
        .await
    {
        Err(tollgate_edge::EngineError::Unavailable(message)) => {
            assert!(message.contains("retry"), "{message}")
        }
        other => panic!("expected unavailable, got {other:?}"),
    }
    store.fail_settlements(false);
    match edge.reverse(a.clone(), reversal, spend).await.unwrap() {
        Decision::Done(amount) => assert_eq!(amount, credits("2")),
        other => panic!("expected the debit reversed: {other:?}"),
    }
    edge.shutdown().await;
}

#[tokio::test]
async fn a_reversal_before_its_debit_is_flushed_asks_to_retry_in_memory() {
    a_reversal_before_its_debit_is_flushed_asks_to_retry(Arc::new(FaultyStore::new(
        MemoryRegionStore::default(),
    )))
    .await;
}

#[tokio::test]
async fn a_reversal_before_its_debit_is_flushed_asks_to_retry_on_redis() {
    let server = RedisServer::start().unwrap();
    let store = RedisRegionStore::connect(&server.url(), "tg:reverse-unflushed", RETAIN_MS_DEFAULT)
        .await
        .unwrap();
    a_reversal_before_its_debit_is_flushed_asks_to_retry(Arc::new(FaultyStore::new(store))).await;
}
