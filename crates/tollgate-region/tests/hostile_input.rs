//! Hostile inputs to the regional store's scripts, on a real redis-server and in memory: costs,
//! amounts and limits anywhere in the i64 range (negative, zero, beyond the store's exact
//! 2^53 − 1 micro-credits), holds expiring before they start, and ids at their length limits.
//! Every call either succeeds within the store's bounds or fails with a typed error, and a
//! failed call leaves the account exactly as it was.

use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use tollgate_core::{
    AccountId, Credits, FeatureKey, GrantId, HoldId, IdempotencyKey, PriceRule, Scope, Timestamp,
};
use tollgate_region::{
    AuthorizeCommand, DebitCommand, MemoryRegionStore, PriceTag, RedisRegionStore, RegionError,
    RegionStore, SegmentSpec, REGION_MICROS_MAX, RETAIN_MS_DEFAULT,
};
use tollgate_testkit::RedisServer;

/// Calls each store takes (each case is one call plus two reads).
const CASES: u32 = 192;

#[derive(Clone, Debug)]
enum Call {
    Install { amount: i64 },
    Debit { cost: i64 },
    Authorize { cost: i64, ttl_ms: i64 },
    OverdraftLimit { limit: i64 },
}

fn micros() -> impl Strategy<Value = i64> {
    prop_oneof![
        Just(0),
        Just(-1),
        Just(i64::MIN),
        Just(i64::MAX),
        Just(REGION_MICROS_MAX),
        Just(REGION_MICROS_MAX + 1),
        -1_000_000_000_i64..1_000_000_000,
        any::<i64>(),
    ]
}

fn calls() -> impl Strategy<Value = Call> {
    prop_oneof![
        micros().prop_map(|amount| Call::Install { amount }),
        micros().prop_map(|cost| Call::Debit { cost }),
        (micros(), -10_000_i64..10_000_000)
            .prop_map(|(cost, ttl_ms)| Call::Authorize { cost, ttl_ms }),
        micros().prop_map(|limit| Call::OverdraftLimit { limit }),
    ]
}

fn at(ms: i64) -> Timestamp {
    Timestamp::from_millis(ms).unwrap()
}

/// Runs one call; returns whether the store refused it with an error.
async fn run<S: RegionStore>(
    store: &S,
    account: &AccountId,
    call: &Call,
    n: u64,
) -> Result<(), RegionError> {
    let key = IdempotencyKey::new(format!("h-{n}")).unwrap();
    let now = at(1_000_000);
    let price = PriceTag::at(1, PriceRule::Default);
    let feature = FeatureKey::new("gen").unwrap();
    match *call {
        Call::Install { amount } => {
            let spec = SegmentSpec {
                grant_id: GrantId::new("g").unwrap(),
                amount: Credits::from_micros(amount),
                priority: 1,
                effective_at: at(0),
                expires_at: None,
                scope: Scope::All,
            };
            store
                .install_segment(account, &key, &spec, now)
                .await
                .map(|_| ())
        }
        Call::Debit { cost } => store
            .debit(&DebitCommand {
                account: account.clone(),
                key,
                feature,
                cost: Credits::from_micros(cost),
                now,
                actor: None,
                price,
                forced: false,
            })
            .await
            .map(|_| ()),
        Call::Authorize { cost, ttl_ms } => store
            .authorize(&AuthorizeCommand {
                account: account.clone(),
                key,
                hold_id: HoldId::new(format!("hold-{n}-{}", "x".repeat(100))).unwrap(),
                feature,
                cost: Credits::from_micros(cost),
                now,
                expires_at: at(now.millis() + ttl_ms),
                actor: None,
                price,
            })
            .await
            .map(|_| ()),
        Call::OverdraftLimit { limit } => {
            store
                .set_overdraft_limit(account, Credits::from_micros(limit), now)
                .await
        }
    }
}

fn check_store<S: RegionStore>(store: &S, runtime: &tokio::runtime::Runtime) {
    let account = AccountId::new("hostile").unwrap();
    let n = std::sync::atomic::AtomicU64::new(0);
    let mut runner = TestRunner::new(Config {
        cases: CASES,
        ..Config::default()
    });
    runner
        .run(&calls(), |call| {
            let n = n.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
            runtime.block_on(async {
                let before = store.view(&account, at(1_000_000)).await.unwrap();
                let outcome = run(store, &account, &call, n).await;
                let after = store.view(&account, at(1_000_000)).await.unwrap();
                match outcome {
                    Ok(()) => {
                        // Whatever it did stays inside the store's exact range.
                        for segment in &after.segments {
                            prop_assert!(
                                (0..=REGION_MICROS_MAX).contains(&segment.remaining.micros())
                            );
                        }
                        prop_assert!(
                            (0..=REGION_MICROS_MAX).contains(&after.overdraft_limit.micros())
                        );
                    }
                    Err(error) => {
                        prop_assert!(
                            !matches!(error, RegionError::Redis(_) | RegionError::Corrupt(_)),
                            "{call:?}: {error}"
                        );
                        prop_assert_eq!(before, after, "{:?} failed but changed the account", call);
                    }
                }
                Ok(())
            })
        })
        .unwrap();
}

#[test]
fn hostile_amounts_in_memory() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    check_store(&MemoryRegionStore::new(RETAIN_MS_DEFAULT), &runtime);
}

#[test]
fn hostile_amounts_on_redis() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let server = RedisServer::start().expect("start redis-server");
    let store = runtime
        .block_on(RedisRegionStore::connect(
            &server.url(),
            "tg:hostile",
            RETAIN_MS_DEFAULT,
        ))
        .unwrap();
    check_store(&store, &runtime);
}
