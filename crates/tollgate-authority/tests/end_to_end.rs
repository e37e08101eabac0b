//! The authority end to end on real servers: PostgreSQL for the ledger and the authority's
//! state, one redis-server per region, and real HTTP receivers for hooks and webhooks, all
//! started by each test for itself. Time is a manual clock.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tollgate_authority::allocator::AllocationOutcome;
use tollgate_authority::http::{signature, ID_HEADER, SIGNATURE_HEADER};
use tollgate_authority::purchases::{refund_purchase, RefundOrder};
use tollgate_authority::reconciler::debit_id;
use tollgate_authority::{
    AccountSettings, Authority, AuthoritySettings, Clock, EventKind, ManualClock, StateStore,
    TopUpSettings, WebhookEndpoint,
};
use tollgate_core::command::{
    Adjust, CloseGrant, CloseKind, CreateAccount, GrantTerms, IssueGrant, Memo, Metadata, Refund,
};
use tollgate_core::{
    AccountId, Credits, Currency, DebitId, EntryKind, FeatureKey, GrantId, GrantSchedule,
    GrantSource, GrantState, HoldId, IdempotencyKey, Money, PeriodUnit, PriceRule, Recurrence,
    RegionId, RolloverPolicy, Scope, Timestamp,
};
use tollgate_ledger::{
    debit_generation, Entry, EntryFilter, LedgerStore, PageRequest, PostgresLedger, Receipt,
};
use tollgate_region::{
    AuthorizeCommand, AuthorizeOutcome, DebitCommand, DebitOutcome, PriceTag, RedisRegionStore,
    Refusal, RegionStore, ReverseCommand, ReverseOutcome, RETAIN_MS_DEFAULT,
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
    redis: BTreeMap<RegionId, RedisServer>,
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
        let mut redis = BTreeMap::new();
        let mut regions = BTreeMap::new();
        for name in names {
            let server = RedisServer::start().expect("start redis-server");
            let store =
                RedisRegionStore::connect(&server.url(), &format!("tg:{name}"), RETAIN_MS_DEFAULT)
                    .await
                    .expect("connect to redis");
            regions.insert(region(name), Arc::new(store));
            redis.insert(region(name), server);
        }
        World {
            _postgres: postgres,
            redis,
            url,
            ledger,
            regions,
            clock: Arc::new(ManualClock::new(at)),
        }
    }

    /// Kills the redis-server of region `name` (the region stops answering).
    fn kill_region(&mut self, name: &str) {
        self.redis
            .get_mut(&region(name))
            .expect("a region of the world")
            .kill();
    }

    /// Region `name` forgets `account`'s idempotency key `key_text`: its record is deleted, as
    /// Redis deletes it when its time to live (`RETAIN_MS_DEFAULT`) runs out. Redis counts that
    /// time on its own clock, which the test's manual clock does not move, so the test cannot
    /// wait for it. Fails unless the region remembered the key.
    fn forget_key(&self, name: &str, account: &str, key_text: &str) {
        // The record's name as `RedisRegionStore::idempotency_key` spells it, under the prefix
        // `start` gave the region.
        let record = format!("tg:{name}:{{{account}}}:idem:{key_text}");
        let port = self.redis[&region(name)].port();
        // One command over RESP: the test depends on no Redis client of its own.
        let mut stream =
            std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect to redis-server");
        let command = format!("*2\r\n$3\r\nDEL\r\n${}\r\n{record}\r\n", record.len());
        stream.write_all(command.as_bytes()).expect("send DEL");
        let mut reply = [0_u8; 16];
        let read = stream.read(&mut reply).expect("read DEL's reply");
        assert_eq!(
            &reply[..read],
            b":1\r\n",
            "the region remembered {record} and deleted it"
        );
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

    /// The account's entries in order.
    async fn ledger_entries(&self, account: &str) -> Vec<Entry> {
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
    }

    /// The account's entries as (kind, grant, amount).
    async fn entries(&self, account: &str) -> Vec<(EntryKind, String, Credits)> {
        self.ledger_entries(account)
            .await
            .iter()
            .map(|e| {
                let grant = e.grant_id.as_ref().map_or(String::new(), |g| g.to_string());
                (e.kind, grant, e.amount)
            })
            .collect()
    }

    /// The account's usage in the ledger: each debit and refund with the debit it belongs to.
    async fn usage_entries(&self, account: &str) -> Vec<(EntryKind, Option<DebitId>, Credits)> {
        self.ledger_entries(account)
            .await
            .into_iter()
            .filter(|e| matches!(e.kind, EntryKind::Debit | EntryKind::Refund))
            .map(|e| (e.kind, e.debit_id, e.amount))
            .collect()
    }

    /// What region `name` holds of the account now: credits in its segments, and overdraft room.
    async fn held(&self, name: &str, account: &str) -> (Credits, Credits) {
        let view = self
            .store(name)
            .view(&acct(account), self.clock.now())
            .await
            .expect("view reaches redis");
        let pool = view.segments.iter().map(|s| s.remaining.micros()).sum();
        let room = view.overdraft_limit.micros() - view.overdraft_used.micros();
        (
            Credits::from_micros(pool),
            Credits::from_micros(room.max(0)),
        )
    }

    /// The regions together hold no more than the ledger's grants (and overdraft room no more
    /// than the limit less the debt), and the account's chain verifies clean.
    async fn assert_exact(&self, account: &str) {
        let snapshot = self.ledger.account(&acct(account)).await.unwrap();
        let (mut pools, mut rooms) = (0, 0);
        for name in self.regions.keys() {
            let (pool, room) = self.held(name.as_str(), account).await;
            pools += pool.micros();
            rooms += room.micros();
        }
        let remaining = snapshot.balance.micros() + snapshot.debt.micros();
        assert!(
            pools <= remaining,
            "regions hold {pools} of grants holding {remaining}"
        );
        assert!(
            rooms <= snapshot.overdraft_limit.micros() - snapshot.debt.micros(),
            "regions hold {rooms} of overdraft room, limit {} debt {}",
            snapshot.overdraft_limit,
            snapshot.debt
        );
        assert!(self
            .ledger
            .verify(Some(&acct(account)))
            .await
            .unwrap()
            .is_clean());
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
            price: PriceTag::at(1, PriceRule::Default),
            forced: false,
        })
        .await
        .expect("debit reaches redis")
}

/// A debit the region must allow.
async fn spend(
    store: &RedisRegionStore,
    account: &str,
    key_text: &str,
    cost: &str,
    now: Timestamp,
) {
    let outcome = debit(store, account, key_text, cost, now).await;
    assert!(
        matches!(outcome, DebitOutcome::Allowed(_)),
        "{key_text}: {outcome:?}"
    );
}

/// A debit the region must refuse for want of credits.
async fn refused(
    store: &RedisRegionStore,
    account: &str,
    key_text: &str,
    cost: &str,
    now: Timestamp,
) {
    let outcome = debit(store, account, key_text, cost, now).await;
    assert!(
        matches!(outcome, DebitOutcome::Refused(Refusal::Insufficient { .. })),
        "{key_text}: {outcome:?}"
    );
}

/// The caller reverses its debit `debit_key` within the window; the credits it gave back.
async fn reverse(
    store: &RedisRegionStore,
    account: &str,
    key_text: &str,
    debit_key: &str,
    now: Timestamp,
) -> Credits {
    let reversed = store
        .reverse(&ReverseCommand {
            account: acct(account),
            key: key(key_text),
            debit_key: key(debit_key),
            now,
            window_ms: 60_000,
        })
        .await
        .expect("reversal reaches redis");
    let ReverseOutcome::Reversed { amount, .. } = reversed else {
        panic!("the reversal is allowed: {reversed:?}");
    };
    amount
}

/// Reconciles region `name` once and checks how many records it applied, reversed and parked.
async fn reconcile_expecting(node: &Node, name: &str, expected: (usize, usize, usize)) {
    let report = node.reconcile_once(&region(name)).await.unwrap();
    assert_eq!(
        (report.applied, report.reversed, report.parked),
        expected,
        "{report:?}"
    );
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
    let amount = reverse(
        &world.store("eu"),
        "acme",
        "undo-eu-0",
        "eu-0",
        world.clock.now(),
    )
    .await;
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
        price: PriceTag::at(1, PriceRule::Default),
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

/// Redis forgets a debit's idempotency key a day after the debit. A caller reusing the key
/// then is charged again, and the ledger keeps that decision apart from the first under the
/// next generation of the debit's id. A reversal names the key, and the region knows only the
/// second decision under it: the ledger refunds that one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_reused_after_the_region_forgot_it_is_charged_and_its_reversal_refunds_that_decision()
{
    let world = World::start(&["eu"], ts("2027-08-01T00:00:00Z")).await;
    world.account("acme", "0").await;
    world.grant("acme", "bought", "100", None).await;
    let node = world.authority(settings()).await;
    allocate(&node, "eu", "acme").await;
    let eu = world.store("eu");
    spend(&eu, "acme", "nightly-job", "2", world.clock.now()).await;
    reconcile_expecting(&node, "eu", (1, 0, 0)).await;
    // A day and more later the region has forgotten the key; the caller reuses it for
    // another spend, which the region charges as new.
    world.clock.advance_ms(RETAIN_MS_DEFAULT + 60_000);
    world.forget_key("eu", "acme", "nightly-job");
    spend(&eu, "acme", "nightly-job", "5", world.clock.now()).await;
    reconcile_expecting(&node, "eu", (1, 0, 0)).await;
    assert_eq!(
        world.balance("acme").await,
        credits("93"),
        "both spends are charged"
    );
    // The region reverses the spend it knows under that key: the second one.
    let given_back = reverse(
        &eu,
        "acme",
        "undo-nightly",
        "nightly-job",
        world.clock.now(),
    )
    .await;
    assert_eq!(given_back, credits("5"));
    reconcile_expecting(&node, "eu", (0, 1, 0)).await;
    assert_eq!(world.balance("acme").await, credits("98"));
    let first = debit_id(&region("eu"), &key("nightly-job")).unwrap();
    let second = debit_generation(&first, 2).unwrap();
    assert_eq!(
        world.usage_entries("acme").await,
        [
            (EntryKind::Debit, Some(first), credits("2")),
            (EntryKind::Debit, Some(second.clone()), credits("5")),
            (EntryKind::Refund, Some(second), credits("5")),
        ]
    );
    assert_eq!(
        world.held("eu", "acme").await,
        (credits("98"), Credits::ZERO)
    );
    world.assert_exact("acme").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reversal_after_a_partial_refund_refunds_the_rest_and_the_region_returns_the_difference()
{
    let world = World::start(&["eu"], ts("2027-08-01T00:00:00Z")).await;
    world.account("acme", "0").await;
    world.grant("acme", "bought", "100", None).await;
    let node = world.authority(settings()).await;
    allocate(&node, "eu", "acme").await;
    let eu = world.store("eu");
    spend(&eu, "acme", "job", "10", world.clock.now()).await;
    reconcile_expecting(&node, "eu", (1, 0, 0)).await;
    // Support refunds 4 of it; the authority hands the 4 out again.
    let refunded = world
        .ledger
        .refund(
            Refund {
                key: key("goodwill"),
                account: acct("acme"),
                debit: debit_id(&region("eu"), &key("job")).unwrap(),
                amount: credits("4"),
                refund_grant_id: None,
                refund_grant_expires_at: None,
                memo: Memo::default(),
            },
            world.clock.now(),
        )
        .await
        .unwrap();
    assert!(refunded.is_ok(), "{refunded:?}");
    node.rebalance(&acct("acme")).await.unwrap();
    assert_eq!(world.held("eu", "acme").await.0, credits("94"));
    // Then the caller reverses the whole spend in the region, which gives all 10 back.
    let given_back = reverse(&eu, "acme", "undo-job", "job", world.clock.now()).await;
    assert_eq!(given_back, credits("10"));
    assert_eq!(world.held("eu", "acme").await.0, credits("104"));
    // The reversal refunds the 6 left; the region returns the 4 refunded already.
    reconcile_expecting(&node, "eu", (0, 1, 0)).await;
    assert_eq!(world.balance("acme").await, credits("100"));
    assert_eq!(world.held("eu", "acme").await.0, credits("100"));
    world.assert_exact("acme").await;
    // Reconciling again changes nothing.
    reconcile_expecting(&node, "eu", (0, 0, 0)).await;
    assert_eq!(world.held("eu", "acme").await.0, credits("100"));
}

/// The movements of `kind` a receipt made, as (grant, amount).
fn movements(receipt: &Receipt, kind: EntryKind) -> Vec<(String, Credits)> {
    receipt
        .movements
        .iter()
        .filter(|m| m.kind == kind)
        .map(|m| {
            let grant = m.grant_id.as_ref().map_or(String::new(), |g| g.to_string());
            (grant, m.amount)
        })
        .collect()
}

/// A void takes the grant's credits back from every region before the ledger closes it: no
/// region spends them after, and the void closes what was really left, the regions' spending
/// not reconciled yet counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_voided_grant_is_taken_back_from_every_redis_region_and_closes_only_what_was_left() {
    let world = World::start(&["eu", "us"], ts("2027-08-01T00:00:00Z")).await;
    world.account("acme", "0").await;
    world.grant("acme", "bought", "100", None).await;
    let node = world
        .authority(AuthoritySettings {
            allocation_micros_min: 40_000_000,
            ..settings()
        })
        .await;
    allocate(&node, "eu", "acme").await;
    allocate(&node, "us", "acme").await;
    assert_eq!(
        world.held("eu", "acme").await,
        (credits("40"), Credits::ZERO)
    );
    assert_eq!(
        world.held("us", "acme").await,
        (credits("40"), Credits::ZERO)
    );
    // Both regions spend, and neither is reconciled before the void.
    spend(&world.store("eu"), "acme", "in-eu", "3", world.clock.now()).await;
    spend(&world.store("us"), "acme", "in-us", "4", world.clock.now()).await;

    let void = CloseGrant {
        key: key("void-bought"),
        account: acct("acme"),
        grant: GrantId::new("bought").unwrap(),
        kind: CloseKind::Void,
        memo: Memo::default(),
    };
    let receipt = node
        .close_grant_everywhere(void.clone())
        .await
        .unwrap()
        .expect("the void is applied");
    assert_eq!(
        movements(&receipt, EntryKind::Void),
        [("bought".to_owned(), credits("93"))]
    );
    for name in ["eu", "us"] {
        assert_eq!(
            world.held(name, "acme").await,
            (Credits::ZERO, Credits::ZERO)
        );
        let after = format!("after-in-{name}");
        refused(&world.store(name), "acme", &after, "1", world.clock.now()).await;
    }
    assert_eq!(world.balance("acme").await, Credits::ZERO);
    assert_eq!(
        world.entries("acme").await,
        [
            (EntryKind::Grant, "bought".to_owned(), credits("100")),
            (EntryKind::Debit, "bought".to_owned(), credits("3")),
            (EntryKind::Debit, "bought".to_owned(), credits("4")),
            (EntryKind::Void, "bought".to_owned(), credits("93")),
        ]
    );
    // The same void again replays its receipt.
    let again = node
        .close_grant_everywhere(void)
        .await
        .unwrap()
        .expect("the void replays");
    assert!(again.replayed);
    assert_eq!(
        movements(&again, EntryKind::Void),
        [("bought".to_owned(), credits("93"))]
    );
    assert_eq!(node.state().parked_count().await.unwrap(), 0);
    world.assert_exact("acme").await;
}

/// A refunded purchase is voided the same way, so the money it owes back is for the credits
/// no region can spend any more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refunded_purchase_voids_and_owes_money_only_for_what_no_redis_region_can_spend() {
    let world = World::start(&["eu"], ts("2027-08-01T00:00:00Z")).await;
    world.account("acme", "0").await;
    let usd = Currency::new("USD").unwrap();
    let paid = Money {
        amount: "10.00".parse().unwrap(),
        currency: usd,
    };
    world
        .issue(
            "acme",
            GrantTerms {
                cost_basis: Some(paid),
                ..GrantTerms::new(
                    GrantId::new("bought").unwrap(),
                    credits("100"),
                    GrantSource::Purchase,
                )
            },
        )
        .await;
    let node = world.authority(settings()).await;
    allocate(&node, "eu", "acme").await;
    let eu = world.store("eu");
    spend(&eu, "acme", "s1", "3", world.clock.now()).await;
    spend(&eu, "acme", "s2", "4", world.clock.now()).await;

    let order = RefundOrder {
        key: key("refund-bought"),
        account: acct("acme"),
        grant: GrantId::new("bought").unwrap(),
        memo: Memo::default(),
    };
    let refunded = refund_purchase(&*world.ledger, &node, order, world.clock.now())
        .await
        .unwrap();
    assert!(refunded.outcome.is_ok(), "{:?}", refunded.outcome);
    assert_eq!(refunded.credits_voided, credits("93"));
    // 93 of the 100 credits bought for 10.00.
    let due = Money {
        amount: "9.30".parse().unwrap(),
        currency: usd,
    };
    assert_eq!(refunded.money_due, Some(due));
    assert_eq!(
        world.held("eu", "acme").await,
        (Credits::ZERO, Credits::ZERO)
    );
    refused(&eu, "acme", "after", "1", world.clock.now()).await;
    assert_eq!(world.balance("acme").await, Credits::ZERO);
    assert_eq!(node.state().parked_count().await.unwrap(), 0);
    world.assert_exact("acme").await;
}

/// A negative adjustment takes back from the region what it takes of the grant before the
/// ledger shrinks it, and only that much: the region can spend the rest, and not one credit
/// more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_negative_adjustment_takes_its_credits_back_from_a_redis_region_before_the_ledger() {
    let world = World::start(&["eu"], ts("2027-08-01T00:00:00Z")).await;
    world.account("acme", "0").await;
    world.grant("acme", "bought", "100", None).await;
    let node = world.authority(settings()).await;
    allocate(&node, "eu", "acme").await;
    let eu = world.store("eu");
    spend(&eu, "acme", "s1", "6", world.clock.now()).await;

    // 94 left, not reconciled yet: taking 90 away leaves 4 the region can spend.
    let receipt = node
        .adjust_everywhere(Adjust {
            key: key("take-90"),
            account: acct("acme"),
            amount: credits("-90"),
            grant_id: None,
            memo: Memo::default(),
            beyond_overdraft: false,
            out: BTreeMap::new(),
        })
        .await
        .unwrap()
        .expect("the adjustment is applied");
    assert_eq!(
        movements(&receipt, EntryKind::Adjust),
        [("bought".to_owned(), credits("-90"))]
    );
    assert_eq!(
        world.held("eu", "acme").await,
        (credits("4"), Credits::ZERO)
    );
    spend(&eu, "acme", "d1", "4", world.clock.now()).await;
    refused(&eu, "acme", "d2", "1", world.clock.now()).await;
    node.reconcile_all(10).await.unwrap();
    assert_eq!(world.balance("acme").await, Credits::ZERO);
    assert_eq!(
        node.state().parked_count().await.unwrap(),
        0,
        "nothing served beyond the ledger"
    );
    world.assert_exact("acme").await;
}
