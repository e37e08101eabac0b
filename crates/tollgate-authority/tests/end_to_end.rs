//! The authority end to end on real servers: PostgreSQL for the ledger and the authority's
//! state, one redis-server per region, and real HTTP receivers for hooks and webhooks, all
//! started by each test for itself. Time is a manual clock.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tollgate_authority::allocator::AllocationOutcome;
use tollgate_authority::http::{signature, ID_HEADER, SIGNATURE_HEADER};
use tollgate_authority::{
    AccountSettings, Authority, AuthoritySettings, Clock, EventKind, ManualClock, StateStore,
    TopUpSettings, WebhookEndpoint,
};
use tollgate_core::command::{CreateAccount, GrantTerms, IssueGrant, Memo, Metadata};
use tollgate_core::{
    AccountId, Credits, EntryKind, FeatureKey, GrantId, GrantSchedule, GrantSource, GrantState,
    HoldId, IdempotencyKey, PeriodUnit, PriceRule, Recurrence, RegionId, RolloverPolicy, Scope,
    Timestamp,
};
use tollgate_ledger::{EntryFilter, LedgerStore, PageRequest, PostgresLedger};
use tollgate_region::{
    AuthorizeCommand, AuthorizeOutcome, DebitCommand, DebitOutcome, PriceTag, RedisRegionStore,
    RegionStore, ReverseCommand, ReverseOutcome, RETAIN_MS_DEFAULT,
};
use tollgate_testkit::{PostgresServer, RedisServer};

type Node = Authority<PostgresLedger, RedisRegionStore>;

fn ts(text: &str) -> Timestamp {
    Timestamp::parse_rfc3339(text).unwrap()
}

fn credits(text: &str) -> Credits {
    Credits::parse(text).unwrap()
}

fn key(text: &str) -> IdempotencyKey {
    IdempotencyKey::new(text).unwrap()
}

fn acct(text: &str) -> AccountId {
    AccountId::new(text).unwrap()
}

fn region(text: &str) -> RegionId {
    RegionId::new(text).unwrap()
}

/// PostgreSQL, one redis-server per region, and a manual clock — owned by one test.
struct World {
    _postgres: PostgresServer,
    _redis: Vec<RedisServer>,
    url: String,
    ledger: Arc<PostgresLedger>,
    regions: BTreeMap<RegionId, Arc<RedisRegionStore>>,
    clock: Arc<ManualClock>,
}

impl World {
    async fn start(names: &[&str], at: Timestamp) -> World {
        let postgres = PostgresServer::start().expect("start an ephemeral PostgreSQL");
        let url = postgres.url();
        let ledger = Arc::new(PostgresLedger::connect(&url).await.expect("ledger"));
        let mut redis = Vec::new();
        let mut regions = BTreeMap::new();
        for name in names {
            let server = RedisServer::start().expect("start redis-server");
            let store =
                RedisRegionStore::connect(&server.url(), &format!("tg:{name}"), RETAIN_MS_DEFAULT)
                    .await
                    .expect("connect to redis");
            regions.insert(region(name), Arc::new(store));
            redis.push(server);
        }
        World {
            _postgres: postgres,
            _redis: redis,
            url,
            ledger,
            regions,
            clock: Arc::new(ManualClock::new(at)),
        }
    }

    /// Kills the redis-server of region `name` (the region stops answering).
    fn kill_region(&mut self, name: &str) {
        let index = self
            .regions
            .keys()
            .position(|r| r.as_str() == name)
            .expect("a region of the world");
        self._redis[index].kill();
    }

    /// A new authority process on the same stores (a restart when an earlier one is dropped).
    async fn authority(&self, settings: AuthoritySettings) -> Node {
        let state = StateStore::connect(&self.url).await.expect("state store");
        Authority::new(
            Arc::clone(&self.ledger),
            state,
            self.regions.clone(),
            self.clock.clone(),
            settings,
        )
    }

    fn store(&self, name: &str) -> Arc<RedisRegionStore> {
        Arc::clone(&self.regions[&region(name)])
    }

    async fn account(&self, account: &str, overdraft: &str) {
        self.ledger
            .create_account(
                CreateAccount {
                    key: key(&format!("create-{account}")),
                    account: acct(account),
                    overdraft_limit: credits(overdraft),
                    metadata: Metadata::default(),
                },
                self.clock.now(),
            )
            .await
            .expect("create account");
    }

    async fn grant(&self, account: &str, id: &str, amount: &str, expires_at: Option<Timestamp>) {
        let source = if expires_at.is_some() {
            GrantSource::Promo
        } else {
            GrantSource::Purchase
        };
        let terms = GrantTerms {
            expires_at,
            ..GrantTerms::new(GrantId::new(id).unwrap(), credits(amount), source)
        };
        self.issue(account, terms).await;
    }

    async fn issue(&self, account: &str, terms: GrantTerms) {
        let id = terms.id.clone();
        self.ledger
            .issue_grant(
                IssueGrant {
                    key: key(&format!("grant-{account}-{id}")),
                    account: acct(account),
                    terms,
                    metadata: Metadata::default(),
                    memo: Memo::default(),
                },
                self.clock.now(),
            )
            .await
            .expect("issue grant")
            .expect("grant accepted");
    }

    async fn balance(&self, account: &str) -> Credits {
        self.ledger.account(&acct(account)).await.unwrap().balance
    }

    async fn entries(&self, account: &str) -> Vec<(EntryKind, String, Credits)> {
        let page = self
            .ledger
            .entries(
                &EntryFilter::account(acct(account)),
                PageRequest {
                    size: 1_000,
                    token: None,
                },
            )
            .await
            .unwrap();
        page.items
            .iter()
            .map(|e| {
                let grant = e.grant_id.as_ref().map_or(String::new(), |g| g.to_string());
                (e.kind, grant, e.amount)
            })
            .collect()
    }
}

fn settings() -> AuthoritySettings {
    AuthoritySettings {
        watermark_lateness_ms: 60_000,
        idle_ms: 365 * 24 * 3_600_000,
        ..AuthoritySettings::default()
    }
}

async fn debit(
    store: &RedisRegionStore,
    account: &str,
    key_text: &str,
    cost: &str,
    now: Timestamp,
) -> DebitOutcome {
    store
        .debit(&DebitCommand {
            account: acct(account),
            key: key(key_text),
            feature: FeatureKey::new("chat").unwrap(),
            cost: credits(cost),
            now,
            actor: None,
            price: PriceTag {
                version: 1,
                rule: PriceRule::Default,
            },
            forced: false,
        })
        .await
        .expect("debit reaches redis")
}

async fn allocate(node: &Node, name: &str, account: &str) {
    let outcome = node
        .request_allocation(
            &region(name),
            &acct(account),
            None,
            tollgate_core::Credits::ZERO,
        )
        .await
        .expect("allocation");
    assert!(
        matches!(outcome, AllocationOutcome::Allocated(_)),
        "{outcome:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_regions_debit_one_account_and_every_acknowledged_debit_is_applied_once() {
    let world = World::start(&["eu", "us"], ts("2027-03-01T00:00:00Z")).await;
    world.account("acme", "0").await;
    world.grant("acme", "bought", "1000", None).await;
    let node = world
        .authority(AuthoritySettings {
            allocation_micros_min: 450_000_000,
            ..settings()
        })
        .await;
    allocate(&node, "eu", "acme").await;
    allocate(&node, "us", "acme").await;
    // The allocations never exceed what the grant holds.
    let installed: i64 = node
        .state()
        .allocations(&acct("acme"))
        .await
        .unwrap()
        .iter()
        .map(|r| r.installed)
        .sum();
    assert_eq!(installed, 900_000_000);

    // Both regions spend at once; every key is sent twice, so replays cross the wire too.
    let mut tasks = Vec::new();
    for name in ["eu", "us"] {
        let store = world.store(name);
        let now = world.clock.now();
        tasks.push(tokio::spawn(async move {
            let mut allowed = 0_i64;
            for n in 0..150 {
                let cost = format!("{}.{:06}", 1 + n % 4, 123_457 * (n + 1) % 1_000_000);
                for _ in 0..2 {
                    if let DebitOutcome::Allowed(a) =
                        debit(&store, "acme", &format!("{name}-{n}"), &cost, now).await
                    {
                        if !a.replayed {
                            allowed += credits(&cost).micros();
                        }
                    }
                }
            }
            allowed
        }));
    }
    // Meanwhile the authority reconciles us as it goes.
    let mut spent = 0_i64;
    let debits = async {
        for task in tasks {
            spent += task.await.unwrap();
        }
    };
    let reconciling = async {
        for _ in 0..20 {
            node.reconcile_once(&region("us")).await.unwrap();
            tokio::task::yield_now().await;
        }
    };
    tokio::join!(debits, reconciling);
    assert!(spent > 0);
    // One eu debit is undone in its region: the ledger refunds it when it is reconciled.
    let reversed = world
        .store("eu")
        .reverse(&ReverseCommand {
            account: acct("acme"),
            key: key("undo-eu-0"),
            debit_key: key("eu-0"),
            now: world.clock.now(),
            window_ms: 60_000,
        })
        .await
        .unwrap();
    let ReverseOutcome::Reversed { amount, .. } = reversed else {
        panic!("the reversal is allowed: {reversed:?}");
    };
    spent -= amount.micros();
    // Then it reads a batch from eu, applies it, and stops before it acknowledges: the
    // records stay pending in eu's stream.
    world.clock.advance_ms(1_000);
    let batch = node.read_usage(&region("eu")).await.unwrap();
    let first = node.apply_usage(&batch).await.unwrap();
    assert!(first.applied > 0);
    drop(batch);
    drop(node);

    // A restarted authority reads the pending records again: the ledger takes each debit once.
    let node = world.authority(settings()).await;
    let replay = node.reconcile_once(&region("eu")).await.unwrap();
    assert_eq!(replay.duplicates, first.applied);
    assert_eq!(replay.applied, 0);
    node.reconcile_all(100).await.unwrap();
    node.reconcile_all(100).await.unwrap();

    assert_eq!(
        world.balance("acme").await,
        Credits::from_micros(1_000_000_000 - spent)
    );
    let debited: i64 = world
        .entries("acme")
        .await
        .iter()
        .filter(|(kind, ..)| *kind == EntryKind::Debit)
        .map(|(.., amount)| amount.micros())
        .sum();
    let refunded: i64 = world
        .entries("acme")
        .await
        .iter()
        .filter(|(kind, ..)| *kind == EntryKind::Refund)
        .map(|(.., amount)| amount.micros())
        .sum();
    assert_eq!(refunded, amount.micros());
    assert_eq!(debited - refunded, spent);
    assert!(world
        .ledger
        .verify(Some(&acct("acme")))
        .await
        .unwrap()
        .is_clean());
    // Every region's watermark moved once its stream was drained.
    assert_eq!(node.state().watermarks().await.unwrap().len(), 2);
}

/// Usage the ledger cannot take is parked in the authority's state on PostgreSQL: listed,
/// counted, and written off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parked_usage_is_listed_counted_and_resolved_on_postgres() {
    use tollgate_authority::parked::{resolve, ParkedAction, ResolveParked};
    use tollgate_authority::state::{ParkedFilter, ParkedState};

    let start = ts("2027-05-01T00:00:00Z");
    let world = World::start(&["eu"], start).await;
    world.account("acme", "0").await;
    world.grant("acme", "bought", "10", None).await;
    let node = world.authority(settings()).await;
    allocate(&node, "eu", "acme").await;
    let spent = debit(&world.store("eu"), "acme", "late", "4", world.clock.now()).await;
    assert!(matches!(spent, DebitOutcome::Allowed(_)), "{spent:?}");
    // The ledger takes the grant away before that spend is reconciled: it is parked.
    world
        .ledger
        .adjust(
            tollgate_core::command::Adjust {
                key: key("taken"),
                account: acct("acme"),
                amount: credits("-10"),
                grant_id: None,
                memo: Memo::new("taken back by hand").unwrap(),
                beyond_overdraft: false,
                out: Default::default(),
            },
            world.clock.now(),
        )
        .await
        .unwrap()
        .unwrap();
    let report = node.reconcile_all(10).await.unwrap();
    assert_eq!(report.parked, 1);
    let state = node.state();
    let open = state
        .parked_after(0, "acme", ParkedFilter::Open, 10)
        .await
        .unwrap();
    assert_eq!(open.len(), 1, "{open:?}");
    assert_eq!(state.parked_open_totals().await.unwrap(), (1, 4_000_000));
    let resolved = resolve(
        world.ledger.as_ref(),
        state,
        &ResolveParked {
            key: key("write-off-1"),
            id: open[0].id,
            action: ParkedAction::WriteOff,
            reason: "goodwill".into(),
            by: "ops".into(),
        },
        world.clock.now(),
    )
    .await
    .unwrap();
    assert_eq!(resolved.record.state, ParkedState::Resolved);
    assert_eq!(state.parked_open_totals().await.unwrap(), (0, 0));
    assert_eq!(
        state
            .parked_after(0, "", ParkedFilter::Resolved, 10)
            .await
            .unwrap()
            .len(),
        1
    );
}

/// A region that does not answer holds back no other region's reconciliation: the others
/// are reconciled, and the failure is reported after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_region_that_does_not_answer_holds_back_no_other_regions_reconciliation() {
    let start = ts("2027-05-01T00:00:00Z");
    let mut world = World::start(&["eu", "us"], start).await;
    world.account("acme", "0").await;
    world.grant("acme", "bought", "100", None).await;
    let node = world.authority(settings()).await;
    allocate(&node, "eu", "acme").await;
    allocate(&node, "us", "acme").await;
    let spent = debit(&world.store("us"), "acme", "in-us", "5", world.clock.now()).await;
    assert!(matches!(spent, DebitOutcome::Allowed(_)), "{spent:?}");
    world.kill_region("eu");
    let reconciled = node.reconcile_all(10).await;
    assert!(reconciled.is_err(), "eu does not answer: {reconciled:?}");
    assert_eq!(world.balance("acme").await, credits("95"));
}

/// Under steady traffic no read finds the stream empty; a read that reaches its end (fewer new
/// records than it asked for) still proves everything decided before it is in, so the watermark
/// moves and expiries do not wait for a quiet moment that never comes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_watermark_moves_under_steady_traffic() {
    let start = ts("2027-06-01T00:00:00Z");
    let world = World::start(&["eu"], start).await;
    world.account("acme", "0").await;
    world.grant("acme", "bought", "100", None).await;
    let node = world.authority(settings()).await;
    allocate(&node, "eu", "acme").await;
    let lateness = settings().watermark_lateness_ms;
    for n in 0..3 {
        world.clock.advance_ms(lateness);
        let read_at = world.clock.now();
        let spent = debit(&world.store("eu"), "acme", &format!("d{n}"), "1", read_at).await;
        assert!(matches!(spent, DebitOutcome::Allowed(_)), "{spent:?}");
        // One read, one record: never an empty read.
        let report = node.reconcile_once(&region("eu")).await.unwrap();
        assert_eq!(report.records, 1);
        let marks = node.state().watermarks().await.unwrap();
        assert_eq!(
            marks.get(&region("eu")).copied(),
            Some(Timestamp::from_millis(read_at.millis() - lateness).unwrap()),
            "after read {n}"
        );
    }
    assert_eq!(world.balance("acme").await, credits("97"));
}

/// A pending hold holds back the expiry of the grants it draws from (its capture carries the
/// authorization's time), and only those: steady holds on an account's other grants would
/// otherwise keep its expiring grants open for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hold_on_another_grant_does_not_hold_back_an_expiry() {
    let start = ts("2027-05-01T00:00:00Z");
    let expiry = ts("2027-05-01T01:00:00Z");
    let world = World::start(&["eu"], start).await;
    world.account("acme", "0").await;
    world.grant("acme", "promo", "100", Some(expiry)).await;
    // A purchase burning first (priority 0): the hold sets its credits aside, not the promo's.
    world
        .issue(
            "acme",
            GrantTerms {
                priority: Some(0),
                ..GrantTerms::new(
                    GrantId::new("bought").unwrap(),
                    credits("50"),
                    GrantSource::Purchase,
                )
            },
        )
        .await;
    let node = world.authority(settings()).await;
    allocate(&node, "eu", "acme").await;
    let hold = |id: &str, cost: &str, expires_at: Timestamp| AuthorizeCommand {
        account: acct("acme"),
        key: key(&format!("auth-{id}")),
        hold_id: HoldId::new(id).unwrap(),
        feature: FeatureKey::new("chat").unwrap(),
        cost: credits(cost),
        now: world.clock.now(),
        expires_at,
        actor: None,
        price: PriceTag {
            version: 1,
            rule: PriceRule::Default,
        },
    };
    // Holds for a day: one on the purchase only...
    let day = Timestamp::from_millis(start.millis() + 24 * 3_600_000).unwrap();
    let placed = world
        .store("eu")
        .authorize(&hold("on-bought", "5", day))
        .await
        .unwrap();
    let AuthorizeOutcome::Held(placed) = placed else {
        panic!("{placed:?}");
    };
    assert_eq!(placed.draws[0].grant_id.as_str(), "bought");

    // ...does not keep the promo open past its expiry.
    world
        .clock
        .set(Timestamp::from_millis(expiry.millis() + 10 * 60_000).unwrap());
    node.reconcile_all(10).await.unwrap();
    let report = node.tick().await.unwrap();
    assert_eq!((report.grants_expired, report.deferred), (1, 0));
    assert_eq!(
        grant_state(&world, "acme", "promo").await,
        (GrantState::Expired, Credits::ZERO)
    );

    // A hold drawing on an expiring grant still holds it back.
    world.grant("acme", "trial", "20", Some(day)).await;
    let spent_bought = world
        .store("eu")
        .authorize(&hold("rest-of-bought", "45", day))
        .await
        .unwrap();
    assert!(matches!(spent_bought, AuthorizeOutcome::Held(_)));
    allocate(&node, "eu", "acme").await;
    let on_trial = world
        .store("eu")
        .authorize(&hold("on-trial", "2", Timestamp::MAX))
        .await
        .unwrap();
    let AuthorizeOutcome::Held(on_trial) = on_trial else {
        panic!("{on_trial:?}");
    };
    assert_eq!(on_trial.draws[0].grant_id.as_str(), "trial");
    world
        .clock
        .set(Timestamp::from_millis(day.millis() + 10 * 60_000).unwrap());
    node.reconcile_all(10).await.unwrap();
    let report = node.tick().await.unwrap();
    assert_eq!(report.grants_expired, 0);
    assert!(report.deferred >= 1);
    assert_eq!(
        grant_state(&world, "acme", "trial").await.0,
        GrantState::Open
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_debit_made_before_expiry_but_reconciled_after_still_burns_the_expiring_grant() {
    let start = ts("2027-05-01T00:00:00Z");
    let expiry = ts("2027-05-01T01:00:00Z");
    let world = World::start(&["eu", "us"], start).await;
    world.account("acme", "0").await;
    world.grant("acme", "promo", "100", Some(expiry)).await;
    world.grant("acme", "bought", "50", None).await;
    let node = world
        .authority(AuthoritySettings {
            allocation_micros_min: 60_000_000,
            ..settings()
        })
        .await;
    allocate(&node, "eu", "acme").await;
    allocate(&node, "us", "acme").await;
    node.reconcile_all(10).await.unwrap();

    // eu spends from the promo one second before it expires...
    world
        .clock
        .set(Timestamp::from_millis(expiry.millis() - 1_000).unwrap());
    let DebitOutcome::Allowed(allowed) = debit(
        &world.store("eu"),
        "acme",
        "late-1",
        "10",
        world.clock.now(),
    )
    .await
    else {
        panic!("the debit is allowed");
    };
    assert_eq!(allowed.draws[0].grant_id.as_str(), "promo");

    // ...but only us is reconciled past the expiry: the promo must stay open.
    world
        .clock
        .set(Timestamp::from_millis(expiry.millis() + 10 * 60_000).unwrap());
    node.reconcile_once(&region("us")).await.unwrap();
    let report = node.tick().await.unwrap();
    assert_eq!(report.grants_expired, 0);
    let promo = grant_state(&world, "acme", "promo").await;
    assert_eq!(promo, (GrantState::Open, credits("100")));

    // Once eu is reconciled the debit burns the promo, and then the rest of it expires.
    node.reconcile_all(10).await.unwrap();
    assert_eq!(
        grant_state(&world, "acme", "promo").await,
        (GrantState::Open, credits("90"))
    );
    let report = node.tick().await.unwrap();
    assert_eq!(report.grants_expired, 1);
    assert_eq!(
        grant_state(&world, "acme", "promo").await,
        (GrantState::Expired, Credits::ZERO)
    );
    let entries = world.entries("acme").await;
    let tail: Vec<_> = entries[entries.len() - 2..].to_vec();
    assert_eq!(
        tail,
        [
            (EntryKind::Debit, "promo".to_owned(), credits("10")),
            (EntryKind::Expire, "promo".to_owned(), credits("90")),
        ]
    );
    assert_eq!(world.balance("acme").await, credits("50"));
    node.notify_pass().await.unwrap();
    let expired = node
        .state()
        .events_of_kind(EventKind::GrantExpired)
        .await
        .unwrap();
    assert_eq!(expired.len(), 1);
    assert_eq!(expired[0].attributes["grant_id"], "promo");
}

async fn grant_state(world: &World, account: &str, grant: &str) -> (GrantState, Credits) {
    let page = world
        .ledger
        .grants(&acct(account), false, PageRequest::default())
        .await
        .unwrap();
    let found = page
        .items
        .iter()
        .find(|r| r.grant.id.as_str() == grant)
        .expect("grant exists");
    (found.grant.state, found.grant.remaining)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn six_months_of_a_monthly_grant_with_percent_rollover_match_hand_computed_entries() {
    let anchor = ts("2027-01-31T00:00:00Z");
    let world = World::start(&["eu"], anchor).await;
    world.account("acme", "0").await;
    let node = world
        .authority(AuthoritySettings {
            allocation_micros_min: 500_000_000,
            ..settings()
        })
        .await;
    let schedule = GrantSchedule {
        id: "pro".to_owned(),
        recurrence: Recurrence::new(anchor, PeriodUnit::Month, 1).unwrap(),
        amount: credits("100"),
        priority: 10,
        scope: Scope::All,
        source: GrantSource::Subscription,
        rollover: RolloverPolicy::Percent {
            percent: rust_decimal::Decimal::new(255, 1),
            cap: None,
        },
    };
    node.create_schedule(&acct("acme"), schedule.clone(), None)
        .await
        .unwrap();
    let spends = ["30", "80", "10", "100", "45.5", "0"];
    for (k, spend) in spends.iter().enumerate() {
        let boundary = schedule.recurrence.boundary(k as u64).unwrap();
        world
            .clock
            .set(Timestamp::from_millis(boundary.millis() + 120_000).unwrap());
        node.reconcile_all(10).await.unwrap();
        node.tick().await.unwrap();
        if k == 0 {
            allocate(&node, "eu", "acme").await;
        }
        world
            .clock
            .set(Timestamp::from_millis(boundary.millis() + 86_400_000).unwrap());
        if *spend != "0" {
            let outcome = debit(
                &world.store("eu"),
                "acme",
                &format!("month-{k}"),
                spend,
                world.clock.now(),
            )
            .await;
            assert!(
                matches!(outcome, DebitOutcome::Allowed(_)),
                "month {k}: {outcome:?}"
            );
        }
        node.reconcile_all(10).await.unwrap();
    }
    let end = schedule.recurrence.boundary(6).unwrap();
    world
        .clock
        .set(Timestamp::from_millis(end.millis() + 120_000).unwrap());
    node.reconcile_all(10).await.unwrap();
    node.tick().await.unwrap();

    use EntryKind::{Debit, Expire, Grant, Rollover};
    let e = |kind, grant: &str, amount: &str| (kind, grant.to_owned(), credits(amount));
    // Computed by hand: the rollover grant (priority 5) burns first; 25.5 % of what the
    // period grant has left carries over, rounded down to the micro-credit; the rest expires.
    let expected = vec![
        e(Grant, "pro.p0", "100"),
        e(Debit, "pro.p0", "30"),
        e(Rollover, "pro.p0", "17.85"),
        e(Rollover, "pro.p0.rollover", "17.85"),
        e(Expire, "pro.p0", "52.15"),
        e(Grant, "pro.p1", "100"),
        e(Debit, "pro.p0.rollover", "17.85"),
        e(Debit, "pro.p1", "62.15"),
        e(Rollover, "pro.p1", "9.65175"),
        e(Rollover, "pro.p1.rollover", "9.65175"),
        e(Expire, "pro.p1", "28.19825"),
        e(Grant, "pro.p2", "100"),
        e(Expire, "pro.p0.rollover", "0"),
        e(Debit, "pro.p1.rollover", "9.65175"),
        e(Debit, "pro.p2", "0.34825"),
        e(Rollover, "pro.p2", "25.411196"),
        e(Rollover, "pro.p2.rollover", "25.411196"),
        e(Expire, "pro.p2", "74.240554"),
        e(Grant, "pro.p3", "100"),
        e(Expire, "pro.p1.rollover", "0"),
        e(Debit, "pro.p2.rollover", "25.411196"),
        e(Debit, "pro.p3", "74.588804"),
        e(Rollover, "pro.p3", "6.479854"),
        e(Rollover, "pro.p3.rollover", "6.479854"),
        e(Expire, "pro.p3", "18.931342"),
        e(Grant, "pro.p4", "100"),
        e(Expire, "pro.p2.rollover", "0"),
        e(Debit, "pro.p3.rollover", "6.479854"),
        e(Debit, "pro.p4", "39.020146"),
        e(Rollover, "pro.p4", "15.549862"),
        e(Rollover, "pro.p4.rollover", "15.549862"),
        e(Expire, "pro.p4", "45.429992"),
        e(Grant, "pro.p5", "100"),
        e(Expire, "pro.p3.rollover", "0"),
        e(Rollover, "pro.p5", "25.5"),
        e(Rollover, "pro.p5.rollover", "25.5"),
        e(Expire, "pro.p5", "74.5"),
        e(Grant, "pro.p6", "100"),
        e(Expire, "pro.p4.rollover", "15.549862"),
    ];
    assert_eq!(world.entries("acme").await, expected);
    assert_eq!(world.balance("acme").await, credits("125.5"));
    assert!(world
        .ledger
        .verify(Some(&acct("acme")))
        .await
        .unwrap()
        .is_clean());
}

/// A real HTTP receiver: records every request, answers from a script (then 200).
#[derive(Clone, Default)]
struct Receiver {
    seen: Arc<Mutex<Vec<Request>>>,
    answers: Arc<Mutex<VecDeque<u16>>>,
}

#[derive(Clone, Debug)]
struct Request {
    id: String,
    signature: String,
    body: String,
}

impl Receiver {
    async fn start(answers: &[u16]) -> (Receiver, SocketAddr) {
        let receiver = Receiver {
            answers: Arc::new(Mutex::new(answers.iter().copied().collect())),
            ..Receiver::default()
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let serving = receiver.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let receiver = serving.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |request| receiver.clone().answer(request));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        (receiver, address)
    }

    async fn answer(
        self,
        request: hyper::Request<hyper::body::Incoming>,
    ) -> Result<hyper::Response<Full<Bytes>>, hyper::Error> {
        let header = |name: &str| {
            request
                .headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned()
        };
        let (id, signature) = (header(ID_HEADER), header(SIGNATURE_HEADER));
        let body = request.into_body().collect().await?.to_bytes();
        let body = String::from_utf8_lossy(&body).into_owned();
        self.seen.lock().unwrap().push(Request {
            id,
            signature,
            body,
        });
        let status = self.answers.lock().unwrap().pop_front().unwrap_or(200);
        let mut response = hyper::Response::new(Full::new(Bytes::new()));
        *response.status_mut() = hyper::StatusCode::from_u16(status).unwrap();
        Ok(response)
    }

    fn requests(&self) -> Vec<Request> {
        self.seen.lock().unwrap().clone()
    }
}

/// Checks `t=<ms>,v1=<hex>` the way a receiver would: recompute the HMAC over "t.body".
fn verify_signature(request: &Request, secret: &str) -> bool {
    let Some((t, v1)) = request.signature.split_once(",v1=") else {
        return false;
    };
    let Some(Ok(ms)) = t.strip_prefix("t=").map(str::parse::<i64>) else {
        return false;
    };
    signature(secret, Timestamp::from_millis(ms).unwrap(), &request.body) == v1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_top_up_hook_is_called_once_per_threshold_crossing_and_a_failing_hook_is_retried_and_reported(
) {
    let world = World::start(&["eu"], ts("2027-06-01T00:00:00Z")).await;
    let (hook, address) = Receiver::start(&[]).await;
    let (failing, failing_address) = Receiver::start(&[500; 16]).await;
    let node = world
        .authority(AuthoritySettings {
            topup_tries_max: 3,
            allocation_micros_min: 100_000_000,
            ..settings()
        })
        .await;
    for (account, at) in [("acme", address), ("bust", failing_address)] {
        world.account(account, "0").await;
        world.grant(account, "bought", "20", None).await;
        let top_up = TopUpSettings {
            hook_url: format!("http://{at}/top-up"),
            secret: "hook-secret".to_owned(),
            threshold: credits("10"),
            amount: credits("50"),
            monthly_cap: credits("500"),
        };
        let settings = AccountSettings {
            top_up: Some(top_up),
            ..AccountSettings::default()
        };
        node.state()
            .set_account_settings(&acct(account), &settings)
            .await
            .unwrap();
        allocate(&node, "eu", account).await;
    }
    let eu = world.store("eu");
    let spend = |account: &'static str, key_text: &'static str, cost: &'static str| {
        let eu = Arc::clone(&eu);
        let now = world.clock.now();
        async move {
            let outcome = debit(&eu, account, key_text, cost, now).await;
            assert!(matches!(outcome, DebitOutcome::Allowed(_)), "{outcome:?}");
        }
    };

    // Down to 8: one crossing, however many passes look at it before the hook answers.
    spend("acme", "a1", "12").await;
    node.reconcile_all(10).await.unwrap();
    node.notify_pass().await.unwrap();
    node.scan_account(&acct("acme")).await.unwrap();
    node.run_top_ups().await.unwrap();
    node.scan_account(&acct("acme")).await.unwrap();
    node.run_top_ups().await.unwrap();
    assert_eq!(hook.requests().len(), 1);
    assert_eq!(world.balance("acme").await, credits("58"));
    // Above the threshold again, then a second crossing: a second call.
    spend("acme", "a2", "5").await;
    allocate(&node, "eu", "acme").await;
    spend("acme", "a3", "45").await;
    node.reconcile_all(10).await.unwrap();
    node.notify_pass().await.unwrap();
    node.run_top_ups().await.unwrap();
    let calls = hook.requests();
    assert_eq!(calls.len(), 2);
    assert_eq!(calls[0].id, "acme:1");
    assert_eq!(calls[1].id, "acme:2");
    assert!(calls.iter().all(|c| verify_signature(c, "hook-secret")));
    assert_eq!(world.balance("acme").await, credits("58"));
    let succeeded = node
        .state()
        .events_of_kind(EventKind::TopupSucceeded)
        .await
        .unwrap();
    assert_eq!(succeeded.len(), 2);

    // The failing hook: tried, retried after each backoff, then reported failed.
    spend("bust", "b1", "15").await;
    node.reconcile_all(10).await.unwrap();
    node.notify_pass().await.unwrap();
    for _ in 0..5 {
        node.run_top_ups().await.unwrap();
        world.clock.advance_ms(node.settings().retry_cap_ms);
    }
    let calls = failing.requests();
    assert_eq!(calls.len(), 3);
    assert!(calls.iter().all(|c| c.id == "bust:1"));
    let failed = node
        .state()
        .events_of_kind(EventKind::TopupFailed)
        .await
        .unwrap();
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0].attributes["reason"], "status 500");
    assert_eq!(failed[0].attributes["tries"], "3");
    assert_eq!(world.balance("bust").await, credits("5"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_are_signed_retried_after_500_and_each_event_id_arrives_once_after_dedup() {
    let world = World::start(&["eu"], ts("2027-07-01T00:00:00Z")).await;
    let (receiver, address) = Receiver::start(&[500, 500, 503]).await;
    let node = world
        .authority(AuthoritySettings {
            webhooks: vec![WebhookEndpoint {
                name: "billing".to_owned(),
                url: format!("http://{address}/events"),
                secret: "whsec".to_owned(),
            }],
            allocation_micros_min: 100_000_000,
            ..settings()
        })
        .await;
    world.account("acme", "5").await;
    world.grant("acme", "bought", "20", None).await;
    let settings = AccountSettings {
        low_balance: Some(credits("10")),
        ..AccountSettings::default()
    };
    node.state()
        .set_account_settings(&acct("acme"), &settings)
        .await
        .unwrap();
    allocate(&node, "eu", "acme").await;
    let mut watch = node.subscribe();

    // 20 → 8 (low) → -3 (exhausted and negative): three events, each once.
    for (n, cost) in ["12", "11"].iter().enumerate() {
        let outcome = debit(
            &world.store("eu"),
            "acme",
            &format!("w{n}"),
            cost,
            world.clock.now(),
        )
        .await;
        assert!(matches!(outcome, DebitOutcome::Allowed(_)), "{outcome:?}");
        node.reconcile_all(10).await.unwrap();
        node.notify_pass().await.unwrap();
        node.notify_pass().await.unwrap();
    }
    let mut streamed = Vec::new();
    while let Ok(event) = watch.try_recv() {
        streamed.push(event.kind);
    }
    assert_eq!(
        streamed,
        [
            EventKind::BalanceLow,
            EventKind::BalanceExhausted,
            EventKind::BalanceNegative
        ]
    );

    for _ in 0..6 {
        node.deliver_due().await.unwrap();
        world.clock.advance_ms(node.settings().retry_cap_ms);
    }
    let requests = receiver.requests();
    // The first three answers were errors, so some events came more than once.
    assert_eq!(requests.len(), 6);
    assert!(requests.iter().all(|r| verify_signature(r, "whsec")));
    assert!(!requests.iter().any(|r| verify_signature(r, "wrong secret")));
    let mut deduplicated = BTreeSet::new();
    let mut kinds = Vec::new();
    for request in &requests {
        let body: serde_json::Value = serde_json::from_str(&request.body).unwrap();
        assert_eq!(body["id"], request.id);
        if deduplicated.insert(request.id.clone()) {
            kinds.push(body["type"].as_str().unwrap().to_owned());
        }
    }
    kinds.sort();
    assert_eq!(
        kinds,
        ["balance.exhausted", "balance.low", "balance.negative"]
    );
    let states = node.state().delivery_states().await.unwrap();
    assert!(
        states.iter().all(|(.., state)| state == "delivered"),
        "{states:?}"
    );
}
