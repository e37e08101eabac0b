//! The edge's decisions over a real regional store: in memory, and on a redis-server started
//! for the test.

mod common;

use common::{book, credits, feature, now, seed, wait_for_lease};

use std::sync::Arc;
use std::time::{Duration, Instant};

use tollgate_core::{AccountId, Credits, IdempotencyKey, PriceRule, RegionId};
use tollgate_edge::{
    Clock, DebitRequest, Decision, EdgeSettings, Engine, EngineError, ManualClock, Refused, Spend,
    SystemClock,
};
use tollgate_region::{
    EnforcementMode, MemoryRegionStore, RateLimit, RatePeriod, RedisRegionStore, RegionStore,
    RETAIN_MS_DEFAULT,
};
use tollgate_testkit::RedisServer;

fn key(text: &str) -> IdempotencyKey {
    IdempotencyKey::new(text).unwrap()
}

fn settings() -> EdgeSettings {
    let mut settings = EdgeSettings::new(RegionId::new("eu").unwrap());
    settings.lease_credits = credits("10");
    settings
}

fn debit(account: &AccountId, k: &str, units: &str) -> DebitRequest {
    common::debit_gen(account, k, units)
}

async fn redis_store(server: &RedisServer, prefix: &str) -> Arc<RedisRegionStore> {
    Arc::new(
        RedisRegionStore::connect(&server.url(), prefix, RETAIN_MS_DEFAULT)
            .await
            .unwrap(),
    )
}

async fn strict_decisions<S: RegionStore>(store: Arc<S>) {
    let a = seed(store.as_ref(), "acct-strict", "10", EnforcementMode::Strict).await;
    let engine = common::priced_engine(Arc::clone(&store), settings(), Arc::new(SystemClock)).await;

    let first = match engine.debit(debit(&a, "d1", "4")).await.unwrap() {
        Decision::Done(done) => done,
        Decision::Refused(refused) => panic!("refused: {refused:?}"),
    };
    assert_eq!(
        (first.priced.cost, first.priced.version, first.priced.rule),
        (credits("2"), 1, PriceRule::Default)
    );
    assert_eq!(
        (first.mode, first.replayed, first.available_after),
        (EnforcementMode::Strict, false, credits("8"))
    );
    let replay = engine.debit(debit(&a, "d1", "4")).await.unwrap();
    assert!(
        matches!(&replay, Decision::Done(d) if d.replayed && d.usage_id == first.usage_id),
        "a replay returns the first result"
    );
    assert_eq!(
        engine.debit(debit(&a, "d1", "5")).await,
        Err(EngineError::Conflict)
    );

    let refused = engine.debit(debit(&a, "d2", "17")).await.unwrap();
    assert_eq!(
        refused,
        Decision::Refused(Refused::Insufficient {
            cost: credits("8.5"),
            available: credits("8"),
            shortfall: credits("0.5")
        })
    );
    let mut unknown_feature = debit(&a, "d3", "1");
    unknown_feature.feature = feature("teleport");
    assert_eq!(
        engine.debit(unknown_feature).await.unwrap(),
        Decision::Refused(Refused::UnknownFeature(feature("teleport")))
    );
    let stranger = AccountId::new("nobody").unwrap();
    assert_eq!(
        engine.debit(debit(&stranger, "d4", "1")).await.unwrap(),
        Decision::Refused(Refused::UnknownAccount(stranger))
    );
    let mut explicit = debit(&a, "d5", "1");
    explicit.spend = Spend::Cost(credits("0.25"));
    assert!(
        matches!(engine.debit(explicit).await.unwrap(), Decision::Done(d) if d.priced.cost == credits("0.25") && d.priced.version == 0)
    );
}

#[tokio::test]
async fn strict_decisions_in_memory() {
    strict_decisions(Arc::new(MemoryRegionStore::default())).await;
}

#[tokio::test]
async fn strict_decisions_on_redis() {
    let server = RedisServer::start().unwrap();
    strict_decisions(redis_store(&server, "tg:strict").await).await;
}

/// Two edges in cached mode spend one account from their leases; a key that reaches both is
/// charged once; the region's usage stream holds exactly what was decided.
async fn cached_decisions<S: RegionStore>(store: Arc<S>) {
    let a = seed(
        store.as_ref(),
        "acct-cached",
        "100",
        EnforcementMode::Cached,
    )
    .await;
    store.create_usage_group("audit").await.unwrap();
    let edge_one = Engine::new(Arc::clone(&store), settings(), Arc::new(SystemClock));
    let edge_two = Engine::new(Arc::clone(&store), settings(), Arc::new(SystemClock));
    for edge in [&edge_one, &edge_two] {
        edge.catalogue()
            .reload_prices(store.as_ref())
            .await
            .unwrap();
    }
    // The first decision of each edge on this cold account is strict; the lease follows.
    let mut allowed = 0;
    for (n, edge) in [(100, &edge_one), (101, &edge_two)] {
        let first = edge.debit(debit(&a, &format!("c{n}"), "2")).await.unwrap();
        assert!(matches!(first, Decision::Done(ref d) if d.mode == EnforcementMode::Strict));
        allowed += 1;
        wait_for_lease(edge, &a).await;
    }
    for n in 0..20 {
        let edge = if n % 2 == 0 { &edge_one } else { &edge_two };
        if let Decision::Done(done) = edge.debit(debit(&a, &format!("c{n}"), "2")).await.unwrap() {
            assert_eq!(done.mode, EnforcementMode::Cached);
            allowed += 1;
        }
    }
    // The same key on both edges: both answer, the region charges it once.
    assert!(matches!(
        edge_one.debit(debit(&a, "both", "2")).await.unwrap(),
        Decision::Done(_)
    ));
    assert!(matches!(
        edge_two.debit(debit(&a, "both", "2")).await.unwrap(),
        Decision::Done(_)
    ));
    edge_one.leases().flush_dirty().await;
    edge_two.leases().flush_dirty().await;
    assert_eq!(
        edge_two
            .leases()
            .stats()
            .duplicates
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );

    let mut charged = Vec::new();
    for _ in 0..100 {
        let records = store.read_usage("audit", "auditor", 500).await.unwrap();
        if records.is_empty() {
            break;
        }
        store
            .ack_usage(
                "audit",
                &records.iter().map(|r| r.id.clone()).collect::<Vec<_>>(),
            )
            .await
            .unwrap();
        charged.extend(records);
    }
    let keys: std::collections::BTreeSet<String> =
        charged.iter().map(|r| r.key.to_string()).collect();
    assert_eq!(keys.len(), charged.len(), "each key charged once");
    assert_eq!(
        charged.len(),
        allowed + 1,
        "every allowed decision reached the stream"
    );
    assert_ne!(
        edge_one.leases().lease_id(),
        edge_two.leases().lease_id(),
        "two edges never share a lease"
    );
    for edge in [&edge_one, &edge_two] {
        assert_eq!(
            edge.leases()
                .stats()
                .lost_entries
                .load(std::sync::atomic::Ordering::Relaxed),
            0
        );
    }
    let total: i64 = charged.iter().map(|r| r.cost.micros()).sum();
    assert!(
        total <= credits("100").micros(),
        "never beyond the allocation"
    );

    edge_one.shutdown().await;
    edge_two.shutdown().await;
    let view = store.view(&a, now()).await.unwrap();
    assert_eq!(
        (view.leases, view.pool()),
        (0, Credits::from_micros(credits("100").micros() - total)),
        "leases returned on shutdown"
    );
}

#[tokio::test]
async fn cached_decisions_in_memory() {
    cached_decisions(Arc::new(MemoryRegionStore::default())).await;
}

#[tokio::test]
async fn cached_decisions_on_redis() {
    let server = RedisServer::start().unwrap();
    cached_decisions(redis_store(&server, "tg:cached").await).await;
}

#[tokio::test]
async fn a_published_price_book_is_picked_up_by_a_running_edge() {
    let server = RedisServer::start().unwrap();
    let store = redis_store(&server, "tg:prices").await;
    let a = seed(
        store.as_ref(),
        "acct-prices",
        "100",
        EnforcementMode::Strict,
    )
    .await;
    let engine = Engine::new(Arc::clone(&store), settings(), Arc::new(SystemClock));
    let tasks = engine.start().await;
    assert_eq!(engine.catalogue().price_generation(), 1);
    let published = Instant::now();
    store.publish_price_book(&book(2, "0.75")).await.unwrap();
    let deadline = published + Duration::from_secs(10);
    while engine.catalogue().price_generation() < 2 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    println!(
        "price book picked up {} ms after publication",
        published.elapsed().as_millis()
    );
    let decided = engine.debit(debit(&a, "after-publish", "4")).await.unwrap();
    assert!(
        matches!(decided, Decision::Done(d) if d.priced.version == 2 && d.priced.cost == credits("3"))
    );
    tasks.iter().for_each(|task| task.abort());
}

#[tokio::test]
async fn a_rate_limited_feature_is_refused_with_when_it_refills() {
    let store = Arc::new(MemoryRegionStore::default());
    let a = seed(store.as_ref(), "acct-rate", "100", EnforcementMode::Cached).await;
    let clock = Arc::new(ManualClock::new(now()));
    let limit = RateLimit {
        amount: credits("1"),
        period: RatePeriod::Second,
        burst: credits("2"),
    };
    store
        .set_rate_limit(&a, &feature("gen"), Some(limit), clock.now())
        .await
        .unwrap();
    let mut summary = store.account_summary(&a).await.unwrap().unwrap();
    summary.rate_limited = [feature("gen")].into();
    store.publish_account(&summary).await.unwrap();
    let engine = common::priced_engine(Arc::clone(&store), settings(), clock.clone()).await;
    assert!(
        matches!(engine.debit(debit(&a, "r1", "4")).await.unwrap(), Decision::Done(d) if d.mode == EnforcementMode::Strict)
    );
    let refused = engine.debit(debit(&a, "r2", "2")).await.unwrap();
    assert_eq!(
        refused,
        Decision::Refused(Refused::RateLimited {
            feature: feature("gen"),
            retry_after_ms: Some(1_000)
        })
    );
    clock.advance_ms(1_000);
    assert!(matches!(
        engine.debit(debit(&a, "r2", "2")).await.unwrap(),
        Decision::Done(_)
    ));
}

#[tokio::test]
async fn reversals_undo_strict_and_cached_debits() {
    let store = Arc::new(MemoryRegionStore::default());
    let a = seed(
        store.as_ref(),
        "acct-reverse",
        "20",
        EnforcementMode::Strict,
    )
    .await;
    let engine = common::priced_engine(Arc::clone(&store), settings(), Arc::new(SystemClock)).await;
    engine.debit(debit(&a, "strict-1", "4")).await.unwrap();
    let mut cached = debit(&a, "cached-1", "6");
    cached.mode = Some(EnforcementMode::Cached);
    engine.debit(cached).await.unwrap();
    assert_eq!(
        engine
            .reverse(a.clone(), key("rev-1"), key("strict-1"))
            .await
            .unwrap(),
        Decision::Done(credits("2"))
    );
    assert_eq!(
        engine
            .reverse(a.clone(), key("rev-2"), key("cached-1"))
            .await
            .unwrap(),
        Decision::Done(credits("3"))
    );
    assert_eq!(
        engine
            .reverse(a.clone(), key("rev-3"), key("strict-1"))
            .await
            .unwrap(),
        Decision::Refused(Refused::Reverse(
            tollgate_region::ReverseRefusal::AlreadyReversed
        ))
    );
    engine.shutdown().await;
    assert_eq!(store.view(&a, now()).await.unwrap().pool(), credits("20"));
}

/// Redis goes away: strict decisions fail with UNAVAILABLE within the store timeout, cached
/// decisions go on from the lease, and once Redis is back the flush catches up.
#[tokio::test]
async fn when_redis_is_down_strict_fails_closed_and_cached_serves_from_its_lease() {
    let mut server = RedisServer::start().unwrap();
    let store = redis_store(&server, "tg:down").await;
    let a = seed(store.as_ref(), "acct-down", "100", EnforcementMode::Strict).await;
    store.create_usage_group("audit").await.unwrap();
    let mut edge_settings = settings();
    edge_settings.lease_credits = credits("40");
    let engine =
        common::priced_engine(Arc::clone(&store), edge_settings, Arc::new(SystemClock)).await;
    let cached = |k: &str| {
        let mut request = debit(&a, k, "2");
        request.mode = Some(EnforcementMode::Cached);
        request
    };
    assert!(matches!(
        engine.debit(cached("warm-up")).await.unwrap(),
        Decision::Done(_)
    ));
    wait_for_lease(&engine, &a).await;
    engine.leases().flush_dirty().await;

    server.kill();
    let started = Instant::now();
    let strict = engine.debit(debit(&a, "strict-while-down", "2")).await;
    assert!(
        matches!(strict, Err(EngineError::Unavailable(_))),
        "strict fails closed: {strict:?}"
    );
    println!(
        "strict refusal came after {} ms (store timeout {} ms)",
        started.elapsed().as_millis(),
        engine.settings().store_timeout_ms
    );
    let mut served = 0;
    for n in 0..10 {
        if let Decision::Done(_) = engine
            .debit(cached(&format!("cached-while-down-{n}")))
            .await
            .unwrap()
        {
            served += 1;
        }
    }
    assert_eq!(served, 10, "cached decisions are served from the lease");
    engine.leases().flush_dirty().await;
    assert!(
        engine.leases().pending() > 0,
        "decisions wait for the region"
    );

    server.restart().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while engine.leases().pending() > 0 && Instant::now() < deadline {
        engine.leases().flush_dirty().await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        engine.leases().pending(),
        0,
        "the flush caught up after Redis came back"
    );
    let mut keys = std::collections::BTreeSet::new();
    for _ in 0..100 {
        let records = store.read_usage("audit", "auditor", 500).await.unwrap();
        if records.is_empty() {
            break;
        }
        store
            .ack_usage(
                "audit",
                &records.iter().map(|r| r.id.clone()).collect::<Vec<_>>(),
            )
            .await
            .unwrap();
        keys.extend(records.into_iter().map(|r| r.key.to_string()));
    }
    assert_eq!(
        keys.len(),
        11,
        "the warm-up and the ten decisions made while Redis was down"
    );
    assert!(!keys.contains("strict-while-down"));
}

/// Prices on a running edge follow the book's versions by time and audience, and an account's
/// contracts: a version scheduled ahead takes effect at its `effective_from`, a grandfathered
/// version never reaches older accounts, a locked contract keeps its version when a newer one
/// is published, and a contract's own rate applies only within its period.
#[tokio::test]
async fn versions_take_effect_on_time_grandfather_and_contracts_hold_their_rates() {
    use tollgate_core::{Audience, Contract, PriceBook, PriceBookVersion, Rate, Timestamp};
    use tollgate_region::AccountSummary;

    let t0 = Timestamp::parse_rfc3339("2027-06-01T00:00:00Z").unwrap();
    let at = |seconds: i64| Timestamp::from_millis(t0.millis() + seconds * 1_000).unwrap();
    let version = |number: u64, from: Timestamp, audience: Audience, rate: &str| PriceBookVersion {
        version: number,
        effective_from: from,
        audience,
        default: [(feature("gen"), Rate::parse(rate).unwrap())].into(),
        ..PriceBookVersion::default()
    };
    let store = Arc::new(MemoryRegionStore::default());
    store
        .publish_price_book(&PriceBook::new(vec![
            version(1, Timestamp::EPOCH, Audience::AllAccounts, "1"),
            version(2, at(10), Audience::AllAccounts, "2"),
            version(3, at(20), Audience::NewAccounts, "3"),
        ]))
        .await
        .unwrap();
    let publish = |name: &str, created_at: Timestamp, contracts: Vec<Contract>| {
        let store = Arc::clone(&store);
        let name = name.to_owned();
        async move {
            let account = seed(store.as_ref(), &name, "1000", EnforcementMode::Strict).await;
            let mut summary: AccountSummary =
                store.account_summary(&account).await.unwrap().unwrap();
            summary.created_at = created_at;
            summary.contracts = contracts;
            store.publish_account(&summary).await.unwrap();
            account
        }
    };
    let contract = |name: &str| Contract {
        account_id: AccountId::new(name).unwrap(),
        rates: Default::default(),
        locked_version: None,
        discount_multiplier: None,
        effective_from: Timestamp::EPOCH,
        effective_until: None,
        no_expiry: false,
    };
    let old = publish("old", Timestamp::EPOCH, Vec::new()).await;
    let fresh = publish("fresh", at(25), Vec::new()).await;
    let locked = publish(
        "locked",
        Timestamp::EPOCH,
        vec![Contract {
            locked_version: Some(1),
            ..contract("locked")
        }],
    )
    .await;
    let deal = publish(
        "deal",
        Timestamp::EPOCH,
        vec![Contract {
            rates: [(feature("gen"), Rate::parse("0.25").unwrap())].into(),
            effective_from: at(5),
            effective_until: Some(at(15)),
            ..contract("deal")
        }],
    )
    .await;

    let clock = Arc::new(ManualClock::new(t0));
    let engine = common::priced_engine(Arc::clone(&store), settings(), clock.clone()).await;
    let mut n = 0;
    let mut priced = |account: &AccountId| {
        n += 1;
        let request = debit(account, &format!("price-{n}"), "4");
        let engine = &engine;
        async move {
            match engine.debit(request).await.unwrap() {
                Decision::Done(done) => (done.priced.cost, done.priced.version, done.priced.rule),
                other => panic!("{other:?}"),
            }
        }
    };
    // Before version 2's time: version 1 for everyone, the deal not yet in force.
    assert_eq!(priced(&old).await, (credits("4"), 1, PriceRule::Default));
    assert_eq!(priced(&deal).await, (credits("4"), 1, PriceRule::Default));
    clock.set(at(10));
    assert_eq!(priced(&old).await, (credits("8"), 2, PriceRule::Default));
    // The locked contract keeps version 1.
    assert_eq!(priced(&locked).await, (credits("4"), 1, PriceRule::Default));
    clock.set(at(12));
    assert_eq!(
        priced(&deal).await,
        (credits("1"), 2, PriceRule::AccountContract)
    );
    clock.set(at(15));
    assert_eq!(priced(&deal).await, (credits("8"), 2, PriceRule::Default));
    // Version 3 is for accounts created from its time on: the old one stays on version 2.
    clock.set(at(30));
    assert_eq!(priced(&old).await, (credits("8"), 2, PriceRule::Default));
    assert_eq!(priced(&fresh).await, (credits("12"), 3, PriceRule::Default));
    assert_eq!(priced(&locked).await, (credits("4"), 1, PriceRule::Default));
}

/// Plays the authority's part on the cold path against the same in-memory region: publishes
/// the account and installs a segment, after a short delay so requests overlap. It can be told
/// to fail its first calls, as an authority that times out would.
struct SlowAuthority {
    store: Arc<MemoryRegionStore>,
    calls: std::sync::atomic::AtomicUsize,
    failures_left: std::sync::atomic::AtomicUsize,
}

impl tollgate_edge::AllocationRequester for SlowAuthority {
    fn request_allocation<'a>(
        &'a self,
        account: &'a AccountId,
        _feature: Option<&'a tollgate_core::FeatureKey>,
        _needed: Credits,
    ) -> std::pin::Pin<
        Box<
            dyn std::future::Future<Output = Result<tollgate_edge::AllocationAnswer, EngineError>>
                + Send
                + 'a,
        >,
    > {
        Box::pin(async move {
            use std::sync::atomic::Ordering::SeqCst;
            self.calls.fetch_add(1, SeqCst);
            tokio::time::sleep(Duration::from_millis(50)).await;
            if self
                .failures_left
                .fetch_update(SeqCst, SeqCst, |n| n.checked_sub(1))
                .is_ok()
            {
                return Err(EngineError::Unavailable("the authority timed out".into()));
            }
            seed(
                self.store.as_ref(),
                account.as_str(),
                "100",
                EnforcementMode::Strict,
            )
            .await;
            Ok(tollgate_edge::AllocationAnswer {
                exists: true,
                unallocated: None,
            })
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_cold_requests_share_one_allocation_and_a_failed_one_is_retried() {
    use std::sync::atomic::Ordering::SeqCst;
    let store = Arc::new(MemoryRegionStore::default());
    store.publish_price_book(&book(1, "0.5")).await.unwrap();
    let authority = Arc::new(SlowAuthority {
        store: Arc::clone(&store),
        calls: Default::default(),
        failures_left: 1.into(),
    });
    let engine = Arc::new(
        Engine::new(Arc::clone(&store), settings(), Arc::new(SystemClock))
            .with_allocator(authority.clone()),
    );
    let cold = AccountId::new("cold").unwrap();

    // The authority fails the first request: the caller hears "unavailable", not "unknown
    // account", and the next request asks again instead of being refused for a while.
    let failed = engine.debit(debit(&cold, "first", "2")).await;
    assert!(
        matches!(failed, Err(EngineError::Unavailable(_))),
        "{failed:?}"
    );
    assert_eq!(authority.calls.load(SeqCst), 1);

    // Eight requests at once: one allocation request, every one of them decided on it.
    let tasks: Vec<_> = (0..8)
        .map(|n| {
            let engine = Arc::clone(&engine);
            let cold = cold.clone();
            tokio::spawn(async move { engine.debit(debit(&cold, &format!("c{n}"), "2")).await })
        })
        .collect();
    for task in tasks {
        let decided = task.await.unwrap().unwrap();
        assert!(matches!(decided, Decision::Done(_)), "{decided:?}");
    }
    assert_eq!(authority.calls.load(SeqCst), 2);
}

/// Credits out on one edge's lease are not lost to the others: a strict decision the region
/// cannot pay recalls the lease (the holder flushes what it decided and gives the rest back)
/// and is allowed; a spend no lease could cover is refused at once.
async fn a_lease_gives_way_to_another_edge<S: RegionStore>(store: Arc<S>) {
    let a = seed(store.as_ref(), "acct-recall", "10", EnforcementMode::Cached).await;
    // Generous: on a loaded machine the holder may take a while to answer.
    let mut patient = settings();
    patient.recall_wait_ms = 2_000;
    let cached = Engine::new(Arc::clone(&store), settings(), Arc::new(SystemClock));
    let strict = Engine::new(Arc::clone(&store), patient, Arc::new(SystemClock));
    for edge in [&cached, &strict] {
        edge.catalogue()
            .reload_prices(store.as_ref())
            .await
            .unwrap();
    }
    let listeners = [
        cached.leases().spawn_recall_listener(),
        strict.leases().spawn_recall_listener(),
    ];
    // The lease takes all 10 credits; 3 are decided from it and wait in the edge's buffer.
    cached.leases().warm(&a);
    wait_for_lease(&cached, &a).await;
    let recalled_before = cached
        .leases()
        .stats()
        .recalled
        .load(std::sync::atomic::Ordering::Relaxed);
    for (k, units) in [("first", "2"), ("on-lease", "4")] {
        match cached.debit(debit(&a, k, units)).await.unwrap() {
            Decision::Done(done) => assert_eq!(done.mode, EnforcementMode::Cached),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(store.view(&a, now()).await.unwrap().pool(), Credits::ZERO);
    // The strict edge needs the 7 credits left on that lease.
    let mut seven = debit(&a, "strict-seven", "14");
    seven.mode = Some(EnforcementMode::Strict);
    match strict.debit(seven).await.unwrap() {
        Decision::Done(done) => assert_eq!(done.priced.cost, credits("7")),
        other => panic!("the lease's credits were the account's: {other:?}"),
    }
    let recalled = cached
        .leases()
        .stats()
        .recalled
        .load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(recalled, recalled_before + 1);
    let view = store.view(&a, now()).await.unwrap();
    assert_eq!((view.pool(), view.leased), (Credits::ZERO, Credits::ZERO));
    // Nothing is left anywhere: refused, without waiting for anyone.
    let mut one = debit(&a, "strict-one", "2");
    one.mode = Some(EnforcementMode::Strict);
    assert!(matches!(
        strict.debit(one).await.unwrap(),
        Decision::Refused(Refused::Insufficient { .. })
    ));
    for listener in listeners {
        listener.abort();
    }
}

#[tokio::test]
async fn a_lease_gives_way_to_another_edge_in_memory() {
    a_lease_gives_way_to_another_edge(Arc::new(MemoryRegionStore::default())).await;
}

#[tokio::test]
async fn a_lease_gives_way_to_another_edge_on_redis() {
    let server = RedisServer::start().unwrap();
    a_lease_gives_way_to_another_edge(redis_store(&server, "tg:recall").await).await;
}
