//! Faults across real processes: PostgreSQL killed and restarted while the authority
//! reconciles a region's usage, and the region's redis-server killed and restarted (AOF) while
//! the region decides. Afterwards the ledger holds every acknowledged debit exactly once, to the
//! micro-credit.

use std::collections::BTreeMap;
use std::sync::Arc;

#[path = "common.rs"]
mod common;

use common::acct;
use tollgate_authority::{Authority, AuthoritySettings, ManualClock, StateStore};
use tollgate_core::{Credits, FeatureKey, IdempotencyKey, PriceRule, RegionId, Timestamp};
use tollgate_ledger::{LedgerStore, PostgresLedger};
use tollgate_region::{
    DebitCommand, DebitOutcome, PriceTag, RedisRegionStore, RegionStore, RETAIN_MS_DEFAULT,
};
use tollgate_testkit::{PostgresServer, RedisServer};

/// Debits each fault test makes.
const DEBITS: usize = 400;
/// Reconciliation passes a test runs at most while waiting for the stream to drain.
const PASSES_MAX: usize = 400;

fn eu() -> RegionId {
    RegionId::new("eu").unwrap()
}

struct World {
    postgres: PostgresServer,
    redis: RedisServer,
    ledger: Arc<PostgresLedger>,
    store: Arc<RedisRegionStore>,
    clock: Arc<ManualClock>,
}

impl World {
    async fn start() -> World {
        let postgres = PostgresServer::start().expect("start an ephemeral PostgreSQL");
        let redis = RedisServer::start().expect("start redis-server");
        let ledger = Arc::new(PostgresLedger::connect(&postgres.url()).await.unwrap());
        let store = Arc::new(
            RedisRegionStore::connect(&redis.url(), "tg:eu", RETAIN_MS_DEFAULT)
                .await
                .unwrap(),
        );
        let clock = Arc::new(ManualClock::new(
            Timestamp::parse_rfc3339("2027-04-01T00:00:00Z").unwrap(),
        ));
        let now = tollgate_authority::Clock::now(clock.as_ref());
        common::open_account(ledger.as_ref(), now).await;
        World {
            postgres,
            redis,
            ledger,
            store,
            clock,
        }
    }

    async fn authority(&self) -> Authority<PostgresLedger, RedisRegionStore> {
        let state = StateStore::connect(&self.postgres.url()).await.unwrap();
        Authority::new(
            Arc::clone(&self.ledger),
            state,
            BTreeMap::from([(eu(), Arc::clone(&self.store))]),
            self.clock.clone(),
            AuthoritySettings {
                allocation_micros_min: 900_000_000,
                allocation_micros_max: 900_000_000,
                idle_ms: 365 * 24 * 3_600_000,
                ..AuthoritySettings::default()
            },
        )
    }

    /// One debit of `micros`; `Some(cost)` when the region acknowledged it.
    async fn debit(&self, key: &str, micros: i64) -> Result<Option<i64>, String> {
        let outcome = self
            .store
            .debit(&DebitCommand {
                account: acct(),
                key: IdempotencyKey::new(key).unwrap(),
                feature: FeatureKey::new("chat").unwrap(),
                cost: Credits::from_micros(micros),
                now: tollgate_authority::Clock::now(self.clock.as_ref()),
                actor: None,
                price: PriceTag::at(1, PriceRule::Default),
                forced: false,
            })
            .await
            .map_err(|e| e.to_string())?;
        Ok(match outcome {
            DebitOutcome::Allowed(_) => Some(micros),
            _ => None,
        })
    }

    /// The ledger's debits by debit id.
    async fn ledger_debits(&self) -> BTreeMap<String, i64> {
        common::ledger_debits(self.ledger.as_ref()).await
    }
}

fn cost_of(n: usize) -> i64 {
    // 0.01 to 0.999999 credits, varied so sums check every micro-credit.
    10_000 + (n as i64 * 7_919) % 990_000
}

/// Reconciles until a pass finds nothing, tolerating the errors of a store that is down.
async fn drain(node: &Authority<PostgresLedger, RedisRegionStore>) -> usize {
    let mut failures = 0;
    for _ in 0..PASSES_MAX {
        match node.reconcile_once(&eu()).await {
            Ok(report) if report.records == 0 => return failures,
            Ok(_) => {}
            Err(_) => {
                failures += 1;
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
    panic!("the usage stream did not drain in {PASSES_MAX} passes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restarted_during_reconciliation_applies_nothing_twice_and_loses_nothing() {
    let mut world = World::start().await;
    let node = world.authority().await;
    node.request_allocation(&eu(), &acct(), None, tollgate_core::Credits::ZERO)
        .await
        .unwrap();
    let mut acknowledged = BTreeMap::new();
    for n in 0..DEBITS {
        let key = format!("d{n}");
        if let Some(micros) = world.debit(&key, cost_of(n)).await.unwrap() {
            acknowledged.insert(key, micros);
        }
    }
    assert_eq!(acknowledged.len(), DEBITS);

    // Reconcile part of the stream, then kill PostgreSQL mid-way and keep trying: batches
    // fail (their transactions never commit, nothing is acknowledged), then it comes back.
    node.reconcile_once(&eu()).await.unwrap();
    world.postgres.kill().unwrap();
    assert!(
        node.reconcile_once(&eu()).await.is_err(),
        "no batch can commit while PostgreSQL is down"
    );
    world.postgres.restart().unwrap();
    let failures = drain(&node).await;
    println!("reconciliation failed {failures} times after the restart before it caught up");

    // A new authority process on the same ledger reads the stream again: nothing new.
    drop(node);
    let again = world.authority().await;
    drain(&again).await;

    let debits = world.ledger_debits().await;
    assert_eq!(debits.len(), DEBITS, "each acknowledged debit once");
    let total: i64 = debits.values().sum();
    assert_eq!(total, acknowledged.values().sum::<i64>());
    let snapshot = world.ledger.account(&acct()).await.unwrap();
    assert_eq!(snapshot.balance.micros(), 1_000_000_000 - total);
    assert!(world.ledger.verify(Some(&acct())).await.unwrap().is_clean());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_and_restarted_with_aof_under_load_loses_no_acknowledged_debit() {
    let mut world = World::start().await;
    let node = world.authority().await;
    node.request_allocation(&eu(), &acct(), None, tollgate_core::Credits::ZERO)
        .await
        .unwrap();
    let mut acknowledged = BTreeMap::new();
    let mut attempted = BTreeMap::new();
    let mut failed = 0;
    for n in 0..DEBITS {
        if n == DEBITS / 2 {
            // A crash: every acknowledged debit before it was fsynced (appendfsync always).
            world.redis.kill();
            for m in 0..5 {
                let key = format!("during-{m}");
                assert!(world.debit(&key, 1).await.is_err(), "redis is down");
            }
            world.redis.restart().expect("restart redis-server");
        }
        let key = format!("d{n}");
        attempted.insert(key.clone(), cost_of(n));
        match world.debit(&key, cost_of(n)).await {
            Ok(Some(micros)) => {
                acknowledged.insert(key, micros);
            }
            Ok(None) => panic!("{key} refused with credits left"),
            // The reconnection may fail a call or two right after the restart.
            Err(_) => failed += 1,
        }
    }
    println!(
        "{} debits acknowledged, {failed} failed around the restart",
        acknowledged.len()
    );
    assert!(acknowledged.len() >= DEBITS - 10, "{}", acknowledged.len());
    drain(&node).await;

    // The ledger knows debits by id; map acknowledged keys to their ids.
    let debits = world.ledger_debits().await;
    let id_of = |key: &str| {
        tollgate_authority::reconciler::debit_id(&eu(), &IdempotencyKey::new(key).unwrap())
            .unwrap()
            .to_string()
    };
    for (key, micros) in &acknowledged {
        assert_eq!(debits.get(&id_of(key)), Some(micros), "{key} in the ledger");
    }
    // Nothing the region did not decide: every ledger debit is an attempted one.
    let attempted_ids: BTreeMap<String, i64> = attempted
        .iter()
        .map(|(key, micros)| (id_of(key), *micros))
        .collect();
    for (id, micros) in &debits {
        assert_eq!(attempted_ids.get(id), Some(micros), "{id} was attempted");
    }
    let total: i64 = debits.values().sum();
    let snapshot = world.ledger.account(&acct()).await.unwrap();
    assert_eq!(snapshot.balance.micros(), 1_000_000_000 - total);
    assert!(world.ledger.verify(Some(&acct())).await.unwrap().is_clean());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_authority_down_the_region_serves_from_its_allocation_then_the_ledger_catches_up()
{
    let world = World::start().await;
    let node = world.authority().await;
    node.request_allocation(&eu(), &acct(), None, tollgate_core::Credits::ZERO)
        .await
        .unwrap();
    // The authority goes away: nothing reconciles, nothing refills.
    drop(node);
    let mut acknowledged = 0_i64;
    for n in 0..DEBITS {
        if let Some(micros) = world.debit(&format!("d{n}"), cost_of(n)).await.unwrap() {
            acknowledged += micros;
        }
    }
    assert!(acknowledged > 0);
    // Meanwhile the ledger has not moved.
    let before = world.ledger.account(&acct()).await.unwrap();
    assert_eq!(before.balance.micros(), 1_000_000_000);
    // It comes back and catches up: the ledger is exact.
    let node = world.authority().await;
    drain(&node).await;
    let debits = world.ledger_debits().await;
    assert_eq!(debits.values().sum::<i64>(), acknowledged);
    let after = world.ledger.account(&acct()).await.unwrap();
    assert_eq!(after.balance.micros(), 1_000_000_000 - acknowledged);
    assert!(world.ledger.verify(Some(&acct())).await.unwrap().is_clean());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_region_cut_off_from_the_authority_spends_no_more_than_it_was_allocated() {
    let world = World::start().await;
    let node = world.authority().await;
    node.request_allocation(&eu(), &acct(), None, tollgate_core::Credits::ZERO)
        .await
        .unwrap();
    let allocated: i64 = node
        .state()
        .allocations(&acct())
        .await
        .unwrap()
        .iter()
        .map(|r| r.outstanding())
        .sum();
    // One region holds everything spendable: the authority keeps nothing back for others.
    assert_eq!(allocated, 1_000_000_000);
    // Partitioned: the authority neither reads this region's stream nor refills it. The region
    // keeps deciding from what it holds, then refuses.
    let mut allowed = 0_i64;
    let mut refused = 0;
    for n in 0..2_000 {
        match world.debit(&format!("p{n}"), 1_000_000).await.unwrap() {
            Some(micros) => allowed += micros,
            None => refused += 1,
        }
    }
    assert_eq!(allowed, allocated, "spent exactly what it held, no more");
    assert_eq!(refused, 2_000 - 1_000);
    // The link comes back: the ledger takes exactly what the region allowed.
    drain(&node).await;
    let after = world.ledger.account(&acct()).await.unwrap();
    assert_eq!(after.balance.micros(), 1_000_000_000 - allocated);
}
