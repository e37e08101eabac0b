//! Cached decisions whose lease expired in the region before their flush: the edge charges each
//! as a strict debit at its event time, keeps what the region does not charge (unbilled) and
//! tries it again (recording it forced once the region has refused it long enough), and charges a reused key under the derived key a settlement would use. Each
//! runs on the in-memory store and on a redis-server started for the test, behind a wrapper
//! that fails strict debits on demand (`common::faulty`). Time is a manual clock: the lease
//! expires and retries come due because the test moves it.

mod common;

use common::faulty::{DebitFault, FaultyStore};
use common::{credits, feature, now, seed, wait_for_lease};

use std::sync::atomic::Ordering;
use std::sync::Arc;

use tollgate_core::{
    AccountId, Credits, Draw, GrantId, IdempotencyKey, LeaseId, PriceRule, Quantity, Rate,
    RegionId, Timestamp,
};
use tollgate_edge::leases::{UNBILLED_FORCED_AFTER_MS, UNBILLED_RETRY_MS_MAX};
use tollgate_edge::metrics::{Metrics, UNBILLED_DECISIONS, UNBILLED_MICROS};
use tollgate_edge::{Clock, DebitRequest, Decision, EdgeSettings, Engine, ManualClock};
use tollgate_region::conformance::{install, segment};
use tollgate_region::{
    DebitCommand, DebitOutcome, EnforcementMode, LeaseRequest, LeaseSettlement, LeaseUsage,
    MemoryRegionStore, PriceTag, RedisRegionStore, RegionStore, SettleOutcome, SettleStatus,
    UsageRecord, RETAIN_MS_DEFAULT,
};
use tollgate_testkit::RedisServer;

/// A lease's life in these tests; the clock is moved past it to expire a lease.
const LEASE_TTL_MS: i64 = 60_000;

fn settings() -> EdgeSettings {
    let mut settings = EdgeSettings::new(RegionId::new("eu").unwrap());
    settings.lease_credits = credits("10");
    settings.lease_ttl_ms = LEASE_TTL_MS;
    settings
}

fn debit(account: &AccountId, key: &str, units: &str) -> DebitRequest {
    common::debit_gen(account, key, units)
}

/// The price the seeded book gives `gen`: version 1, default rule.
fn price() -> PriceTag {
    PriceTag::at(1, PriceRule::Default)
}

/// The price of `units` of `gen` in the seeded book (half a credit each), as a decision from a
/// lease carries it.
fn gen_price(units: &str) -> PriceTag {
    PriceTag {
        quantity: Some(Quantity::parse(units).unwrap()),
        rate: Some(Rate::parse("0.5").unwrap()),
        ..price()
    }
}

struct Setup<S: RegionStore> {
    store: Arc<FaultyStore<S>>,
    edge: Engine<FaultyStore<S>>,
    clock: Arc<ManualClock>,
    account: AccountId,
}

/// An edge on a manual clock holding a lease (10 credits) on a fresh cached account funded
/// with `amount`.
async fn edge_with_lease<S: RegionStore>(store: S, account: &str, amount: &str) -> Setup<S> {
    let store = Arc::new(FaultyStore::new(store));
    let a = seed(store.as_ref(), account, amount, EnforcementMode::Cached).await;
    store.create_usage_group("audit").await.unwrap();
    let clock = Arc::new(ManualClock::new(now()));
    let edge = common::priced_engine(Arc::clone(&store), settings(), clock.clone()).await;
    edge.leases().warm(&a);
    wait_for_lease(&edge, &a).await;
    Setup {
        store,
        edge,
        clock,
        account: a,
    }
}

/// A cached decision at the clock's time; returns that time.
async fn cached_debit<S: RegionStore>(setup: &Setup<S>, key: &str, units: &str) -> Timestamp {
    let at = setup.clock.now();
    match setup
        .edge
        .debit(debit(&setup.account, key, units))
        .await
        .unwrap()
    {
        Decision::Done(done) => assert_eq!(done.mode, EnforcementMode::Cached),
        other => panic!("expected a cached decision: {other:?}"),
    }
    at
}

/// Moves the clock past the lease's expiry, so the next flush finds no lease in the region.
fn expire_lease<S: RegionStore>(setup: &Setup<S>) {
    setup.clock.advance_ms(LEASE_TTL_MS + 1_000);
}

/// Usage records appended since the last call (each read once).
async fn new_records<S: RegionStore>(store: &S) -> Vec<UsageRecord> {
    let records = store.read_usage("audit", "auditor", 100).await.unwrap();
    let ids: Vec<_> = records.iter().map(|r| r.id.clone()).collect();
    store.ack_usage("audit", &ids).await.unwrap();
    records
}

fn unbilled_gauges<S: RegionStore>(setup: &Setup<S>) -> (String, String) {
    let leases = setup.edge.leases();
    let text = Metrics::new()
        .unwrap()
        .render(leases.stats(), leases.pending(), 0);
    let line = |name: &str| {
        text.lines()
            .find(|l| l.starts_with(&format!("{name} ")))
            .unwrap_or_else(|| panic!("no {name} in\n{text}"))
            .to_string()
    };
    (line(UNBILLED_DECISIONS), line(UNBILLED_MICROS))
}

// ---- (a) event time ---------------------------------------------------------------------------

/// A decision whose lease expired before its flush is charged at the time it was decided, not
/// at the flush: the usage record carries the decision's time.
async fn an_expired_leases_decision_is_charged_at_its_event_time<S: RegionStore>(store: S) {
    let setup = edge_with_lease(store, "acct-event-time", "100").await;
    setup.clock.advance_ms(500);
    let decided_at = cached_debit(&setup, "late-1", "4").await;
    expire_lease(&setup);
    let flushed_at = setup.clock.now();
    setup.edge.leases().flush_account(&setup.account).await;

    let records = new_records(setup.store.as_ref()).await;
    assert_eq!(records.len(), 1, "{records:?}");
    assert_eq!(records[0].key.as_str(), "late-1");
    assert_eq!(records[0].cost, credits("2"));
    assert_eq!(
        records[0].at, decided_at,
        "charged at the decision's time, not the flush's ({flushed_at})"
    );
    assert_eq!(setup.edge.leases().pending(), 0);
    assert_eq!(setup.edge.leases().unbilled_of(&setup.account), 0);
    setup.edge.shutdown().await;
}

#[tokio::test]
async fn an_expired_leases_decision_is_charged_at_its_event_time_in_memory() {
    an_expired_leases_decision_is_charged_at_its_event_time(MemoryRegionStore::default()).await;
}

#[tokio::test]
async fn an_expired_leases_decision_is_charged_at_its_event_time_on_redis() {
    let server = RedisServer::start().unwrap();
    let store = RedisRegionStore::connect(&server.url(), "tg:event-time", RETAIN_MS_DEFAULT)
        .await
        .unwrap();
    an_expired_leases_decision_is_charged_at_its_event_time(store).await;
}

// ---- (b) a failing store ----------------------------------------------------------------------

/// The direct charge fails (store down), then is applied but its reply lost, then answered: the
/// decision waits unbilled in between, counted in the gauges, and is charged exactly once.
async fn a_failed_direct_charge_is_retried_and_charged_once<S: RegionStore>(store: S) {
    let setup = edge_with_lease(store, "acct-retry", "100").await;
    let decided_at = cached_debit(&setup, "retry-1", "6").await;
    expire_lease(&setup);
    let leases = setup.edge.leases();

    setup.store.debits(DebitFault::Fail);
    leases.flush_account(&setup.account).await;
    assert_eq!(leases.unbilled_of(&setup.account), 1, "kept, not dropped");
    assert_eq!(leases.pending(), 1);
    assert_eq!(leases.unflushed(&setup.account), credits("3"));
    assert_eq!(
        unbilled_gauges(&setup),
        (
            format!("{UNBILLED_DECISIONS} 1"),
            format!("{UNBILLED_MICROS} 3000000")
        )
    );
    assert!(new_records(setup.store.as_ref()).await.is_empty());

    // Not due yet: the next pass leaves it alone.
    let calls = setup.store.debit_calls();
    leases.flush_account(&setup.account).await;
    assert_eq!(
        setup.store.debit_calls(),
        calls,
        "backoff: not tried again at once"
    );

    // Applied by the store, reply lost: still unbilled on the edge.
    setup.clock.advance_ms(UNBILLED_RETRY_MS_MAX);
    setup.store.debits(DebitFault::LoseNextReply);
    leases.flush_account(&setup.account).await;
    assert_eq!(leases.unbilled_of(&setup.account), 1);

    // Answered: the retry replays the charge made by the lost attempt.
    setup.clock.advance_ms(UNBILLED_RETRY_MS_MAX);
    leases.flush_account(&setup.account).await;
    assert_eq!(leases.unbilled_of(&setup.account), 0);
    assert_eq!(leases.pending(), 0);
    assert_eq!(
        unbilled_gauges(&setup),
        (
            format!("{UNBILLED_DECISIONS} 0"),
            format!("{UNBILLED_MICROS} 0")
        )
    );
    let records = new_records(setup.store.as_ref()).await;
    assert_eq!(records.len(), 1, "charged exactly once: {records:?}");
    assert_eq!(
        (records[0].key.as_str(), records[0].cost, records[0].at),
        ("retry-1", credits("3"), decided_at)
    );
    assert_eq!(leases.stats().lost_entries.load(Ordering::Relaxed), 0);
    setup.edge.shutdown().await;
    let view = setup.store.view(&setup.account, now()).await.unwrap();
    assert_eq!((view.leases, view.pool()), (0, credits("97")));
}

#[tokio::test]
async fn a_failed_direct_charge_is_retried_and_charged_once_in_memory() {
    a_failed_direct_charge_is_retried_and_charged_once(MemoryRegionStore::default()).await;
}

#[tokio::test]
async fn a_failed_direct_charge_is_retried_and_charged_once_on_redis() {
    let server = RedisServer::start().unwrap();
    let store = RedisRegionStore::connect(&server.url(), "tg:retry", RETAIN_MS_DEFAULT)
        .await
        .unwrap();
    a_failed_direct_charge_is_retried_and_charged_once(store).await;
}

// ---- (c) a reused key -------------------------------------------------------------------------

/// The key the settlement path charges a reused key under, for the same decision: a lease taken
/// and settled by hand on another account of the same store.
async fn derived_key_of_settlement<S: RegionStore>(
    store: &S,
    key: &str,
    cost: Credits,
    units: &str,
    at: Timestamp,
) -> IdempotencyKey {
    let other = seed(store, "acct-derived-check", "100", EnforcementMode::Cached).await;
    let strict = DebitCommand {
        account: other.clone(),
        key: IdempotencyKey::new(key).unwrap(),
        feature: feature("gen"),
        cost: credits("1"),
        now: at,
        actor: None,
        price: price(),
        forced: false,
    };
    assert!(matches!(
        store.debit(&strict).await.unwrap(),
        DebitOutcome::Allowed(_)
    ));
    let lease_id = LeaseId::new("check.lease").unwrap();
    store
        .take_lease(&LeaseRequest {
            account: other.clone(),
            key: IdempotencyKey::new("check.take").unwrap(),
            lease_id: lease_id.clone(),
            amount: credits("10"),
            now: at,
            expires_at: Timestamp::from_millis(at.millis() + LEASE_TTL_MS).unwrap(),
        })
        .await
        .unwrap();
    let settled = store
        .settle_lease(&LeaseSettlement {
            account: other,
            lease_id,
            now: at,
            expires_at: Timestamp::from_millis(at.millis() + LEASE_TTL_MS).unwrap(),
            entries: vec![LeaseUsage {
                key: IdempotencyKey::new(key).unwrap(),
                feature: feature("gen"),
                at,
                draws: vec![Draw {
                    grant_id: GrantId::new("g1").unwrap(),
                    amount: cost,
                }],
                overdraft: Credits::ZERO,
                actor: None,
                price: gen_price(units),
            }],
        })
        .await
        .unwrap();
    match settled {
        SettleOutcome::Settled(statuses) => match &statuses[..] {
            [SettleStatus::Rekeyed { key, .. }] => key.clone(),
            other => panic!("expected a rekeyed entry: {other:?}"),
        },
        SettleOutcome::NoLease => panic!("the lease was just taken"),
    }
}

/// A key charged for one request (1 credit, strict) reaches the cached edge with another body
/// (3 credits), and its lease expires before the flush: the direct charge conflicts, so the
/// edge charges it under the derived key a settlement would use, and counts it.
async fn a_reused_key_is_charged_under_the_settlements_derived_key<S: RegionStore>(store: S) {
    let setup = edge_with_lease(store, "acct-reused-direct", "100").await;
    let strict = DebitCommand {
        account: setup.account.clone(),
        key: IdempotencyKey::new("cheap").unwrap(),
        feature: feature("gen"),
        cost: credits("1"),
        now: setup.clock.now(),
        actor: None,
        price: price(),
        forced: false,
    };
    assert!(matches!(
        setup.store.debit(&strict).await.unwrap(),
        DebitOutcome::Allowed(_)
    ));
    let decided_at = cached_debit(&setup, "cheap", "6").await;
    expire_lease(&setup);
    let leases = setup.edge.leases();
    leases.flush_account(&setup.account).await;

    assert_eq!(leases.stats().rekeyed.load(Ordering::Relaxed), 1);
    assert_eq!(leases.unbilled_of(&setup.account), 0);
    let records = new_records(setup.store.as_ref()).await;
    assert_eq!(records.len(), 2, "{records:?}");
    assert_eq!(
        (records[0].key.as_str(), records[0].cost),
        ("cheap", credits("1"))
    );
    let expected =
        derived_key_of_settlement(setup.store.as_ref(), "cheap", credits("3"), "6", decided_at)
            .await;
    assert_eq!(
        (&records[1].key, records[1].cost, records[1].at),
        (&expected, credits("3"), decided_at),
        "charged under the settlement's derived key, at the decision's time"
    );
    setup.edge.shutdown().await;
}

#[tokio::test]
async fn a_reused_key_is_charged_under_the_settlements_derived_key_in_memory() {
    a_reused_key_is_charged_under_the_settlements_derived_key(MemoryRegionStore::default()).await;
}

#[tokio::test]
async fn a_reused_key_is_charged_under_the_settlements_derived_key_on_redis() {
    let server = RedisServer::start().unwrap();
    let store = RedisRegionStore::connect(&server.url(), "tg:reused-direct", RETAIN_MS_DEFAULT)
        .await
        .unwrap();
    a_reused_key_is_charged_under_the_settlements_derived_key(store).await;
}

// ---- a refusal --------------------------------------------------------------------------------

/// The lease's credits went back to the region and were spent there before the flush: the
/// region cannot pay the served decision. It stays unbilled (not lost) and is charged once the
/// region holds credits again.
async fn a_refused_direct_charge_waits_for_credits<S: RegionStore>(store: S) {
    let (setup, decided_at) = refused_direct_charge(store, "acct-refused").await;
    let leases = setup.edge.leases();

    // A top-up effective before the decision, so it can pay at the decision's time.
    let mut top_up = segment("g2", "10", 50, None);
    top_up.effective_at = Timestamp::EPOCH;
    install(setup.store.as_ref(), &setup.account, top_up).await;
    setup.clock.advance_ms(UNBILLED_RETRY_MS_MAX);
    leases.flush_account(&setup.account).await;
    assert_eq!(leases.unbilled_of(&setup.account), 0);
    let records = new_records(setup.store.as_ref()).await;
    let served: Vec<_> = records
        .iter()
        .filter(|r| r.key.as_str() == "served-1")
        .collect();
    assert_eq!(served.len(), 1, "{records:?}");
    assert_eq!((served[0].cost, served[0].at), (credits("4"), decided_at));
    assert_eq!(served[0].overdraft, Credits::ZERO, "paid from the top-up");
    setup.edge.shutdown().await;
}

/// A served decision the region cannot pay (its lease's credits were spent elsewhere), refused
/// once and kept unbilled; answers the setup and the decision's time.
async fn refused_direct_charge<S: RegionStore>(store: S, account: &str) -> (Setup<S>, Timestamp) {
    let setup = edge_with_lease(store, account, "10").await;
    // 4 of the lease's 10 credits: above half a lease left, so no refill runs in the background.
    let decided_at = cached_debit(&setup, "served-1", "8").await;
    expire_lease(&setup);
    // Reading the account gives the expired lease back to the segments; spend all of them.
    let view = setup
        .store
        .view(&setup.account, setup.clock.now())
        .await
        .unwrap();
    assert_eq!((view.leases, view.pool()), (0, credits("10")));
    let elsewhere = DebitCommand {
        account: setup.account.clone(),
        key: IdempotencyKey::new("elsewhere").unwrap(),
        feature: feature("gen"),
        cost: credits("10"),
        now: setup.clock.now(),
        actor: None,
        price: price(),
        forced: false,
    };
    let spent = setup.store.debit(&elsewhere).await.unwrap();
    assert!(matches!(spent, DebitOutcome::Allowed(_)), "{spent:?}");
    let leases = setup.edge.leases();
    leases.flush_account(&setup.account).await;
    assert_eq!(leases.unbilled_of(&setup.account), 1, "refused, kept");
    assert_eq!(leases.stats().lost_entries.load(Ordering::Relaxed), 0);
    (setup, decided_at)
}

/// No credits come: once it has waited `UNBILLED_FORCED_AFTER_MS`, the decision is recorded
/// forced, as overdraft beyond the region's room, so it reaches the authority (which charges
/// it as debt or parks it) instead of waiting on this edge.
async fn a_decision_the_region_keeps_refusing_is_recorded_forced<S: RegionStore>(store: S) {
    let (setup, decided_at) = refused_direct_charge(store, "acct-forced").await;
    let leases = setup.edge.leases();
    setup.clock.advance_ms(UNBILLED_RETRY_MS_MAX);
    leases.flush_account(&setup.account).await;
    assert_eq!(
        leases.unbilled_of(&setup.account),
        1,
        "still waiting for credits"
    );
    setup.clock.advance_ms(UNBILLED_FORCED_AFTER_MS);
    leases.flush_account(&setup.account).await;
    assert_eq!(leases.unbilled_of(&setup.account), 0);
    assert_eq!(
        unbilled_gauges(&setup),
        (
            format!("{UNBILLED_DECISIONS} 0"),
            format!("{UNBILLED_MICROS} 0")
        )
    );
    let records = new_records(setup.store.as_ref()).await;
    let served: Vec<_> = records
        .iter()
        .filter(|r| r.key.as_str() == "served-1")
        .collect();
    assert_eq!(served.len(), 1, "{records:?}");
    assert_eq!((served[0].cost, served[0].at), (credits("4"), decided_at));
    assert_eq!(
        (served[0].draws.len(), served[0].overdraft),
        (0, credits("4")),
        "nothing in the segments: all of it overdraft beyond the room"
    );
    setup.edge.shutdown().await;
}

#[tokio::test]
async fn a_decision_the_region_keeps_refusing_is_recorded_forced_in_memory() {
    a_decision_the_region_keeps_refusing_is_recorded_forced(MemoryRegionStore::default()).await;
}

#[tokio::test]
async fn a_decision_the_region_keeps_refusing_is_recorded_forced_on_redis() {
    let server = RedisServer::start().unwrap();
    let store = RedisRegionStore::connect(&server.url(), "tg:forced", RETAIN_MS_DEFAULT)
        .await
        .unwrap();
    a_decision_the_region_keeps_refusing_is_recorded_forced(store).await;
}

#[tokio::test]
async fn a_refused_direct_charge_waits_for_credits_in_memory() {
    a_refused_direct_charge_waits_for_credits(MemoryRegionStore::default()).await;
}

#[tokio::test]
async fn a_refused_direct_charge_waits_for_credits_on_redis() {
    let server = RedisServer::start().unwrap();
    let store = RedisRegionStore::connect(&server.url(), "tg:refused", RETAIN_MS_DEFAULT)
        .await
        .unwrap();
    a_refused_direct_charge_waits_for_credits(store).await;
}

// ---- shutdown ---------------------------------------------------------------------------------

/// Graceful shutdown tries every unbilled decision, due or not.
async fn shutdown_charges_unbilled_decisions<S: RegionStore>(store: S) {
    let setup = edge_with_lease(store, "acct-shutdown", "100").await;
    cached_debit(&setup, "before-stop", "2").await;
    expire_lease(&setup);
    setup.store.debits(DebitFault::Fail);
    setup.edge.leases().flush_account(&setup.account).await;
    assert_eq!(setup.edge.leases().unbilled_of(&setup.account), 1);

    setup.store.debits(DebitFault::None);
    setup.edge.shutdown().await;
    assert_eq!(setup.edge.leases().pending(), 0);
    let records = new_records(setup.store.as_ref()).await;
    assert_eq!(records.len(), 1, "{records:?}");
    assert_eq!(records[0].key.as_str(), "before-stop");
}

#[tokio::test]
async fn shutdown_charges_unbilled_decisions_in_memory() {
    shutdown_charges_unbilled_decisions(MemoryRegionStore::default()).await;
}

#[tokio::test]
async fn shutdown_charges_unbilled_decisions_on_redis() {
    let server = RedisServer::start().unwrap();
    let store = RedisRegionStore::connect(&server.url(), "tg:shutdown", RETAIN_MS_DEFAULT)
        .await
        .unwrap();
    shutdown_charges_unbilled_decisions(store).await;
}
