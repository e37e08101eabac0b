//! The cached-mode bound in code (docs/answer.md, "The cached-mode bound"): an edge decides from
//! a lease only before its deadline, the lease's expiry in the region as the region last
//! confirmed it less `lease_safety_ms`; a settlement the region accepts moves the deadline; and
//! at the pending cap (per account, per edge) cached requests are decided strict. Each test
//! runs on the in-memory store and on a redis-server started for it, behind the wrapper of
//! `common::faulty`, which makes the region stop answering on demand. Time is a manual clock:
//! the tests move it, nothing here waits for time to pass.

mod common;

use common::faulty::FaultyStore;
use common::{credits, now, seed, wait_for_lease};

use std::sync::atomic::Ordering;
use std::sync::Arc;

use tollgate_core::{AccountId, Credits, RegionId, Timestamp};
use tollgate_edge::metrics::{Metrics, LEASE_DEADLINE_PASSED_TOTAL, PENDING_CAP_REACHED_TOTAL};
use tollgate_edge::{
    Clock, DebitRequest, Decision, EdgeSettings, Engine, EngineError, ManualClock,
};
use tollgate_region::{
    EnforcementMode, MemoryRegionStore, RedisRegionStore, RegionStore, RETAIN_MS_DEFAULT,
};
use tollgate_testkit::RedisServer;

const LEASE_TTL_MS: i64 = 60_000;
const LEASE_SAFETY_MS: i64 = 2_000;

fn settings() -> EdgeSettings {
    let mut settings = EdgeSettings::new(RegionId::new("eu").unwrap());
    settings.lease_credits = credits("10");
    settings.lease_ttl_ms = LEASE_TTL_MS;
    settings.lease_safety_ms = LEASE_SAFETY_MS;
    // The summary read at the first decision stays trusted for the whole test, so only the
    // lease decides whether a request is cached.
    settings.account_summary_ttl_ms = 100 * LEASE_TTL_MS;
    settings
}

fn debit(account: &AccountId, key: &str) -> DebitRequest {
    // 2 units at 0.5: one credit, far from the refill threshold of a 10-credit lease.
    common::debit_gen(account, key, "2")
}

struct Setup<S: RegionStore> {
    store: Arc<FaultyStore<S>>,
    edge: Engine<FaultyStore<S>>,
    clock: Arc<ManualClock>,
    /// When the edge took its leases: each expires in the region at `t0 + LEASE_TTL_MS`.
    t0: Timestamp,
}

/// An edge on a manual clock holding a 10-credit lease on each of `accounts` (cached, funded
/// with 100 credits), taken at `t0`. No flusher or maintenance runs: the test calls them.
async fn edge_with_leases<S: RegionStore>(
    store: S,
    accounts: &[&str],
    settings: EdgeSettings,
) -> (Setup<S>, Vec<AccountId>) {
    let store = Arc::new(FaultyStore::new(store));
    let mut ids = Vec::new();
    for account in accounts {
        ids.push(seed(store.as_ref(), account, "100", EnforcementMode::Cached).await);
    }
    let t0 = now();
    let clock = Arc::new(ManualClock::new(t0));
    let edge = common::priced_engine(Arc::clone(&store), settings, clock.clone()).await;
    for a in &ids {
        edge.leases().warm(a);
        wait_for_lease(&edge, a).await;
        // Read the summary once, while the region answers, and settle what that decided.
        cached(&edge, a, &format!("warm-{a}")).await;
        edge.leases().flush_account(a).await;
        assert_eq!(edge.leases().pending_of(a), 0);
    }
    let setup = Setup {
        store,
        edge,
        clock,
        t0,
    };
    (setup, ids)
}

/// `ms` after the leases were taken.
fn at<S: RegionStore>(setup: &Setup<S>, ms: i64) -> Timestamp {
    setup.t0.checked_add_ms(ms).unwrap()
}

/// A debit that must be decided from the lease.
async fn cached<S: RegionStore>(edge: &Engine<S>, account: &AccountId, key: &str) {
    match edge.debit(debit(account, key)).await {
        Ok(Decision::Done(done)) => {
            assert_eq!(done.mode, EnforcementMode::Cached, "{key}: {done:?}")
        }
        other => panic!("{key}: expected a cached decision, got {other:?}"),
    }
}

/// A debit the region must decide (strict), and which fails because it does not answer.
async fn unavailable<S: RegionStore>(edge: &Engine<S>, account: &AccountId, key: &str) {
    match edge.debit(debit(account, key)).await {
        Err(EngineError::Unavailable(_)) => {}
        other => panic!("{key}: expected UNAVAILABLE (strict, region down), got {other:?}"),
    }
}

fn metric_line<S: RegionStore>(setup: &Setup<S>, name: &str) -> String {
    let leases = setup.edge.leases();
    let text = Metrics::new()
        .unwrap()
        .render(leases.stats(), leases.pending(), 0);
    text.lines()
        .find(|l| l.starts_with(&format!("{name} ")))
        .unwrap_or_else(|| panic!("no {name} in\n{text}"))
        .to_string()
}

async fn redis_store(server: &RedisServer, prefix: &str) -> RedisRegionStore {
    RedisRegionStore::connect(&server.url(), prefix, RETAIN_MS_DEFAULT)
        .await
        .unwrap()
}

// ---- (a) the deadline ---------------------------------------------------------------------

/// The region stops answering right after the lease is taken: the edge decides from its lease
/// up to the last millisecond before `expiry − safety`, and from the deadline on sends cached
/// requests to the region (strict), which fails them as unavailable; nothing decided is lost,
/// and once the region answers again a settlement renews the lease and cached decisions resume.
async fn a_cut_off_edge_stops_deciding_at_the_deadline<S: RegionStore>(store: S) {
    let (setup, accounts) = edge_with_leases(store, &["acct-deadline"], settings()).await;
    let a = &accounts[0];
    let leases = setup.edge.leases();
    let deadline_ms = LEASE_TTL_MS - LEASE_SAFETY_MS;
    setup.store.set_down(true);

    setup.clock.set(at(&setup, 1_000));
    cached(&setup.edge, a, "a-1").await;
    setup.clock.set(at(&setup, deadline_ms - 1));
    cached(&setup.edge, a, "a-2").await;
    let available = leases.available(a, None, setup.clock.now());

    setup.clock.set(at(&setup, deadline_ms));
    unavailable(&setup.edge, a, "a-3").await;
    // Within a second of a failed renewal, a request does not ask the region to renew again.
    setup.clock.set(at(&setup, deadline_ms + 500));
    unavailable(&setup.edge, a, "a-4").await;
    assert_eq!(leases.stats().deadline_passed.load(Ordering::Relaxed), 2);
    assert_eq!(
        metric_line(&setup, LEASE_DEADLINE_PASSED_TOTAL),
        format!("{LEASE_DEADLINE_PASSED_TOTAL} 2")
    );
    assert!(available.is_positive(), "the lease paid up to its deadline");
    // Past its deadline the lease pays nothing and counts nothing: the region may take its
    // credits back at the lease's expiry while this edge cannot tell.
    assert_eq!(leases.available(a, None, setup.clock.now()), Credits::ZERO);
    assert_eq!(
        leases.pending_of(a),
        2,
        "the decisions made before it wait, and none was decided from the lease past it"
    );

    // The region answers again before the lease expires there: the next cached request renews
    // it (its pending decisions settle) and is decided from it.
    setup.store.set_down(false);
    setup.clock.set(at(&setup, LEASE_TTL_MS - 100));
    cached(&setup.edge, a, "a-5").await;
    assert_eq!(
        leases.pending_of(a),
        1,
        "a-1 and a-2 settled by the renewal"
    );
    assert_eq!(leases.stats().deadline_passed.load(Ordering::Relaxed), 2);
    setup.edge.shutdown().await;
}

#[tokio::test]
async fn a_cut_off_edge_stops_deciding_at_the_deadline_in_memory() {
    a_cut_off_edge_stops_deciding_at_the_deadline(MemoryRegionStore::default()).await;
}

#[tokio::test]
async fn a_cut_off_edge_stops_deciding_at_the_deadline_on_redis() {
    let server = RedisServer::start().unwrap();
    let store = redis_store(&server, "tg:deadline").await;
    a_cut_off_edge_stops_deciding_at_the_deadline(store).await;
}

// ---- (b) renewal --------------------------------------------------------------------------

/// A settlement the region accepts at `t0 + 40 s` moves the lease's expiry there to
/// `t0 + 100 s`, and the edge's deadline with it: cut off after that settlement, the edge decides
/// past the first deadline (`t0 + 58 s`) up to `t0 + 98 s`, and not from then on. The region
/// indeed still holds the lease just before `t0 + 100 s`.
async fn a_settlement_extends_the_deadline<S: RegionStore>(store: S) {
    let (setup, accounts) = edge_with_leases(store, &["acct-renewal"], settings()).await;
    let a = &accounts[0];
    let leases = setup.edge.leases();
    let settled_at_ms = 40_000;
    let deadline_ms = settled_at_ms + LEASE_TTL_MS - LEASE_SAFETY_MS;

    setup.clock.set(at(&setup, settled_at_ms));
    cached(&setup.edge, a, "b-1").await;
    leases.flush_account(a).await;
    assert_eq!(leases.pending_of(a), 0, "settled");

    setup.store.set_down(true);
    setup.clock.set(at(&setup, LEASE_TTL_MS));
    cached(&setup.edge, a, "b-2").await;
    setup.clock.set(at(&setup, deadline_ms - 1));
    cached(&setup.edge, a, "b-3").await;
    setup.clock.set(at(&setup, deadline_ms));
    unavailable(&setup.edge, a, "b-4").await;
    assert_eq!(leases.stats().deadline_passed.load(Ordering::Relaxed), 1);

    setup.store.set_down(false);
    let view = setup
        .store
        .view(a, at(&setup, settled_at_ms + LEASE_TTL_MS - 1))
        .await
        .unwrap();
    assert_eq!(view.leases, 1, "the region still holds the lease");
    setup.edge.shutdown().await;
}

#[tokio::test]
async fn a_settlement_extends_the_deadline_in_memory() {
    a_settlement_extends_the_deadline(MemoryRegionStore::default()).await;
}

#[tokio::test]
async fn a_settlement_extends_the_deadline_on_redis() {
    let server = RedisServer::start().unwrap();
    let store = redis_store(&server, "tg:renewal").await;
    a_settlement_extends_the_deadline(store).await;
}

// ---- (c) the pending cap ------------------------------------------------------------------

/// A strict decision, made by the region.
async fn strict<S: RegionStore>(edge: &Engine<S>, account: &AccountId, key: &str) {
    match edge.debit(debit(account, key)).await {
        Ok(Decision::Done(done)) => {
            assert_eq!(done.mode, EnforcementMode::Strict, "{key}: {done:?}");
            assert!(done.usage_id.is_some(), "{key}: charged in the region");
        }
        other => panic!("{key}: expected a strict decision, got {other:?}"),
    }
}

/// Settlements fail (a slow region) while strict calls pass: once the account has
/// `pending_entries_account_max` decisions waiting, the next cached request is decided strict,
/// and counted; after a flush, cached decisions resume.
async fn the_account_cap_sends_cached_requests_strict<S: RegionStore>(store: S) {
    let mut settings = settings();
    settings.pending_entries_account_max = 3;
    let (setup, accounts) = edge_with_leases(store, &["acct-cap"], settings).await;
    let a = &accounts[0];
    let leases = setup.edge.leases();
    leases.flush_account(a).await;
    setup.store.fail_settlements(true);

    for key in ["c-1", "c-2", "c-3"] {
        cached(&setup.edge, a, key).await;
        leases.flush_account(a).await;
    }
    assert_eq!(leases.pending_of(a), 3);
    strict(&setup.edge, a, "c-4").await;
    assert_eq!(leases.pending_of(a), 3, "nothing added past the cap");
    assert_eq!(
        leases.stats().pending_cap_reached.load(Ordering::Relaxed),
        1
    );
    assert_eq!(
        metric_line(&setup, PENDING_CAP_REACHED_TOTAL),
        format!("{PENDING_CAP_REACHED_TOTAL} 1")
    );

    setup.store.fail_settlements(false);
    leases.flush_account(a).await;
    assert_eq!(leases.pending_of(a), 0);
    cached(&setup.edge, a, "c-5").await;
    setup.edge.shutdown().await;
}

#[tokio::test]
async fn the_account_cap_sends_cached_requests_strict_in_memory() {
    the_account_cap_sends_cached_requests_strict(MemoryRegionStore::default()).await;
}

#[tokio::test]
async fn the_account_cap_sends_cached_requests_strict_on_redis() {
    let server = RedisServer::start().unwrap();
    let store = redis_store(&server, "tg:cap-account").await;
    the_account_cap_sends_cached_requests_strict(store).await;
}

/// The edge's cap counts every account: two decisions waiting on two accounts fill a cap of
/// two, and a third account-level-allowed request is decided strict.
async fn the_edge_cap_sends_cached_requests_strict<S: RegionStore>(store: S) {
    let mut settings = settings();
    settings.pending_entries_max = 2;
    let (setup, accounts) = edge_with_leases(store, &["acct-cap-x", "acct-cap-y"], settings).await;
    let (x, y) = (&accounts[0], &accounts[1]);
    let leases = setup.edge.leases();
    leases.flush_account(x).await;
    leases.flush_account(y).await;
    setup.store.fail_settlements(true);

    cached(&setup.edge, x, "e-1").await;
    cached(&setup.edge, y, "e-2").await;
    strict(&setup.edge, x, "e-3").await;
    assert_eq!(leases.pending(), 2);
    assert_eq!(
        leases.stats().pending_cap_reached.load(Ordering::Relaxed),
        1
    );

    setup.store.fail_settlements(false);
    leases.flush_account(x).await;
    cached(&setup.edge, x, "e-4").await;
    setup.edge.shutdown().await;
}

#[tokio::test]
async fn the_edge_cap_sends_cached_requests_strict_in_memory() {
    the_edge_cap_sends_cached_requests_strict(MemoryRegionStore::default()).await;
}

#[tokio::test]
async fn the_edge_cap_sends_cached_requests_strict_on_redis() {
    let server = RedisServer::start().unwrap();
    let store = redis_store(&server, "tg:cap-edge").await;
    the_edge_cap_sends_cached_requests_strict(store).await;
}
