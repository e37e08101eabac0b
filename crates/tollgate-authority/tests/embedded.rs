//! The authority on the embedded stores (SQLite ledger and state, in-memory regions, a manual
//! clock).
//!
//! The allocator: refills under the low-water mark (and before the region cannot pay the next
//! spend of the size it sees), idle take-back, credits moved on demand from an idle region (and
//! kept by a busy one), the overdraft split across regions (and its shrinking when the limit is
//! lowered), and install intents that a crash left open. After every step, what the regions
//! hold never exceeds what the ledger's grants hold plus the overdraft limit.
//!
//! Plans: an upgrade mid-period with proration, and the reinstatement of credits that expired
//! just before an upgrade, checked entry by entry.

use std::collections::BTreeMap;
use std::sync::Arc;

use tollgate_authority::allocator::AllocationOutcome;
use tollgate_authority::plans::{Plan, PlanChange, PlanChangeReport, PlanGrant, Proration};
use tollgate_authority::settings::MOVE_IDLE_MS_DEFAULT;
use tollgate_authority::state::InstallIntent;
use tollgate_authority::{Authority, AuthoritySettings, Clock, ManualClock, StateStore};
use tollgate_core::command::{
    CreateAccount, GrantTerms, IssueGrant, Memo, Metadata, UpdateAccount,
};
use tollgate_core::{
    AccountId, Credits, EntryKind, FeatureKey, GrantId, GrantSource, IdempotencyKey, PeriodUnit,
    PlanId, PriceRule, Recurrence, RegionId, RolloverPolicy, Scope, Timestamp,
};
use tollgate_ledger::{EntryFilter, LedgerStore, PageRequest, SqliteLedger};
use tollgate_region::{
    DebitCommand, DebitOutcome, MemoryRegionStore, PriceTag, RegionStore, SegmentSpec,
    RETAIN_MS_DEFAULT,
};

type Node = Authority<SqliteLedger, MemoryRegionStore>;

const MICROS: i64 = 1_000_000;

fn acct() -> AccountId {
    AccountId::new("acme").unwrap()
}

fn region(name: &str) -> RegionId {
    RegionId::new(name).unwrap()
}

fn key(text: &str) -> IdempotencyKey {
    IdempotencyKey::new(text).unwrap()
}

/// Issues grant `id` of `credits` to the account.
async fn issue(
    ledger: &SqliteLedger,
    id: &str,
    credits: i64,
    source: GrantSource,
    expires_at: Option<Timestamp>,
    now: Timestamp,
) {
    let terms = GrantTerms {
        expires_at,
        ..GrantTerms::new(
            GrantId::new(id).unwrap(),
            Credits::from_micros(credits * MICROS),
            source,
        )
    };
    ledger
        .issue_grant(
            IssueGrant {
                key: key(&format!("grant-{id}")),
                account: acct(),
                terms,
                metadata: Metadata::default(),
                memo: Memo::default(),
            },
            now,
        )
        .await
        .unwrap()
        .unwrap();
}

struct World {
    _dir: tempfile::TempDir,
    node: Node,
    ledger: Arc<SqliteLedger>,
    regions: BTreeMap<RegionId, Arc<MemoryRegionStore>>,
    clock: Arc<ManualClock>,
}

impl World {
    /// An account with `overdraft` credits of overdraft and one grant of `granted` credits
    /// (none when zero), on regions `names`, each targeted at `target` credits.
    async fn start(names: &[&str], overdraft: i64, granted: i64, target: i64) -> World {
        Self::start_at(names, overdraft, granted, target, "2027-05-01T00:00:00Z").await
    }

    async fn start_at(
        names: &[&str],
        overdraft: i64,
        granted: i64,
        target: i64,
        at: &str,
    ) -> World {
        Self::start_within(names, overdraft, granted, (target, target), at).await
    }

    /// As [`World::start_at`], each region's target within `[min, max]` credits.
    async fn start_within(
        names: &[&str],
        overdraft: i64,
        granted: i64,
        (min, max): (i64, i64),
        at: &str,
    ) -> World {
        let dir = tempfile::tempdir().unwrap();
        let ledger = Arc::new(
            SqliteLedger::open(&dir.path().join("ledger.db"))
                .await
                .unwrap(),
        );
        let state_url = format!(
            "sqlite://{}?mode=rwc",
            dir.path().join("state.db").display()
        );
        let state = StateStore::connect(&state_url).await.unwrap();
        let clock = Arc::new(ManualClock::new(Timestamp::parse_rfc3339(at).unwrap()));
        let regions: BTreeMap<RegionId, Arc<MemoryRegionStore>> = names
            .iter()
            .map(|n| {
                (
                    region(n),
                    Arc::new(MemoryRegionStore::new(RETAIN_MS_DEFAULT)),
                )
            })
            .collect();
        let settings = AuthoritySettings {
            allocation_micros_min: min * MICROS,
            allocation_micros_max: max * MICROS,
            low_water_percent: 50,
            idle_ms: 60_000,
            watermark_lateness_ms: 60_000,
            ..AuthoritySettings::default()
        };
        let node = Authority::new(
            Arc::clone(&ledger),
            state,
            regions.clone(),
            clock.clone(),
            settings,
        );
        ledger
            .create_account(
                CreateAccount {
                    key: key("create"),
                    account: acct(),
                    overdraft_limit: Credits::from_micros(overdraft * MICROS),
                    metadata: Metadata::default(),
                },
                clock.now(),
            )
            .await
            .unwrap();
        if granted > 0 {
            issue(
                &ledger,
                "bought",
                granted,
                GrantSource::Purchase,
                None,
                clock.now(),
            )
            .await;
        }
        World {
            _dir: dir,
            node,
            ledger,
            regions,
            clock,
        }
    }

    /// A purchase grant `bought` of `credits`, issued now, never expiring.
    async fn buy(&self, credits: i64) {
        issue(
            &self.ledger,
            "bought",
            credits,
            GrantSource::Purchase,
            None,
            self.clock.now(),
        )
        .await;
    }

    fn store(&self, name: &str) -> &MemoryRegionStore {
        &self.regions[&region(name)]
    }

    async fn allocate(&self, name: &str) {
        let outcome = self
            .node
            .request_allocation(&region(name), &acct(), None, tollgate_core::Credits::ZERO)
            .await
            .unwrap();
        assert!(
            matches!(outcome, AllocationOutcome::Allocated(_)),
            "{outcome:?}"
        );
    }

    /// Spendable credits a region holds now (segments and overdraft room), in micros.
    async fn held(&self, name: &str) -> (i64, i64) {
        let view = self
            .store(name)
            .view(&acct(), self.clock.now())
            .await
            .unwrap();
        let pool = view.segments.iter().map(|s| s.remaining.micros()).sum();
        let room = view.overdraft_limit.micros() - view.overdraft_used.micros();
        (pool, room.max(0))
    }

    async fn debit(&self, name: &str, id: &str, credits: i64) -> bool {
        let outcome = self
            .store(name)
            .debit(&DebitCommand {
                account: acct(),
                key: key(id),
                feature: FeatureKey::new("chat").unwrap(),
                cost: Credits::from_micros(credits * MICROS),
                now: self.clock.now(),
                actor: None,
                price: PriceTag::at(1, PriceRule::Default),
                forced: false,
            })
            .await
            .unwrap();
        matches!(outcome, DebitOutcome::Allowed(_))
    }

    /// Spends `credits` in region `name` as an edge does: when the region holds less, it asks
    /// the authority for the difference first (the cold path). Returns whether it had to.
    async fn spend_via_cold_path(&self, name: &str, id: &str, credits: i64) -> bool {
        let short = credits * MICROS - self.held(name).await.0;
        if short > 0 {
            let outcome = self
                .node
                .request_allocation(
                    &region(name),
                    &acct(),
                    Some(&FeatureKey::new("chat").unwrap()),
                    Credits::from_micros(short),
                )
                .await
                .unwrap();
            assert!(
                matches!(outcome, AllocationOutcome::Allocated(_)),
                "{outcome:?}"
            );
        }
        assert!(self.debit(name, id, credits).await, "{id} refused");
        short > 0
    }

    /// The caller reverses its debit `debit` (within the window) in region `name`.
    async fn reverse(&self, name: &str, id: &str, debit: &str) {
        let reversed = self
            .store(name)
            .reverse(&tollgate_region::ReverseCommand {
                account: acct(),
                key: key(id),
                debit_key: key(debit),
                now: self.clock.now(),
                window_ms: 60_000,
            })
            .await
            .unwrap();
        assert!(
            matches!(reversed, tollgate_region::ReverseOutcome::Reversed { .. }),
            "{reversed:?}"
        );
    }

    /// Reconciles `name` once and checks how many records it applied, reversed and parked.
    async fn reconcile_expecting(
        &self,
        name: &str,
        applied: usize,
        reversed: usize,
        parked: usize,
    ) {
        let report = self.node.reconcile_once(&region(name)).await.unwrap();
        assert_eq!(
            (report.applied, report.reversed, report.parked),
            (applied, reversed, parked),
            "{report:?}"
        );
    }

    /// Nothing parked, the balance at `balance` credits, the ledger's checks clean.
    async fn assert_settled(&self, balance: i64) {
        assert_eq!(self.node.state().parked_count().await.unwrap(), 0);
        let snapshot = self.ledger.account(&acct()).await.unwrap();
        assert_eq!(snapshot.balance.micros(), balance * MICROS);
        assert!(self.ledger.verify(None).await.unwrap().is_clean());
    }

    /// The invariant: every region's segments and overdraft room together never exceed what
    /// the ledger's grants hold plus the limit less the debt.
    /// Nothing over-allocated, and the ledger verifies clean.
    async fn assert_exact(&self) {
        self.assert_never_over_allocated().await;
        assert!(self.ledger.verify(Some(&acct())).await.unwrap().is_clean());
    }

    async fn assert_never_over_allocated(&self) {
        let snapshot = self.ledger.account(&acct()).await.unwrap();
        let mut pools = 0;
        let mut rooms = 0;
        for name in self.regions.keys() {
            let (pool, room) = self.held(name.as_str()).await;
            pools += pool;
            rooms += room;
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
    }

    async fn installed_outstanding(&self, grant: &str) -> i64 {
        self.node
            .state()
            .allocations(&acct())
            .await
            .unwrap()
            .iter()
            .filter(|r| r.grant_id == grant)
            .map(|r| r.outstanding())
            .sum()
    }
}

#[tokio::test]
async fn a_pool_under_its_low_water_mark_is_refilled_to_its_target() {
    // Two regions: one region alone is never sliced (it holds everything spendable).
    let world = World::start(&["eu", "us"], 0, 100, 10).await;
    world.allocate("eu").await;
    assert_eq!(world.held("eu").await, (10 * MICROS, 0));
    // Spending 4 leaves 6, above half the target: nothing moves.
    assert!(world.debit("eu", "d1", 4).await);
    world.node.reconcile_once(&region("eu")).await.unwrap();
    assert_eq!(world.held("eu").await.0, 6 * MICROS);
    // Spending 2 more leaves 4, under half: the reconciler refills it back to 10.
    assert!(world.debit("eu", "d2", 2).await);
    world.node.reconcile_once(&region("eu")).await.unwrap();
    assert_eq!(world.held("eu").await.0, 10 * MICROS);
    let snapshot = world.ledger.account(&acct()).await.unwrap();
    assert_eq!(snapshot.balance.micros(), 94 * MICROS);
    assert_eq!(world.installed_outstanding("bought").await, 10 * MICROS);
    world.assert_never_over_allocated().await;
}

/// Spends of 40 credits, ten minutes apart: too rare for the burn rate to lift the target above
/// its 10-credit minimum, so each one found the region short and went through the cold path.
/// The target now covers several spends of the size the region sees, and the low-water mark at
/// least one, so only the first spend asks the authority.
#[tokio::test]
async fn a_region_is_refilled_to_pay_the_next_spend_of_the_size_it_sees() {
    // Two regions, so the target is not everything spendable.
    let world =
        World::start_within(&["eu", "us"], 0, 1_000, (10, 1_000), "2027-05-01T00:00:00Z").await;
    world.allocate("eu").await;
    assert_eq!(world.held("eu").await.0, 10 * MICROS);

    let mut cold = 0;
    for n in 0..6 {
        world.clock.advance_ms(600_000);
        if world.spend_via_cold_path("eu", &format!("d{n}"), 40).await {
            cold += 1;
        }
        world.reconcile_expecting("eu", 1, 0, 0).await;
        let seen = world
            .node
            .state()
            .region_account(&region("eu"), &acct())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(seen.spend_micros, 40 * MICROS);
        // The burn rate alone would keep the target at its minimum.
        assert!(seen.burn_micros_per_s * 60 < 10 * MICROS, "{seen:?}");
        // Refilled (when it had to be) without the region asking: the next spend is paid.
        let (pool, _) = world.held("eu").await;
        assert!(pool >= 40 * MICROS, "after d{n} eu holds {pool}");
        assert!(pool <= 160 * MICROS, "after d{n} eu holds {pool}");
        world.assert_never_over_allocated().await;
    }
    assert_eq!(
        cold, 1,
        "only the first spend, before any was seen, is a cold one"
    );
    world.assert_settled(1_000 - 6 * 40).await;
}

/// Found by the simulation (`tollgate-sim`, seed 18): a reversal gives its draws back in the
/// region, a later debit spends them again, and both arrive in one batch. Applied in stream
/// order the ledger has the credits back before the later debit needs them; applied debits
/// first, the later debit found the grant short and was parked.
#[tokio::test]
async fn credits_a_reversal_gave_back_can_be_spent_again_in_the_same_batch() {
    let world = World::start(&["eu"], 0, 10, 10).await;
    world.allocate("eu").await;
    assert!(world.debit("eu", "first", 10).await);
    world.reverse("eu", "undo-first", "first").await;
    assert!(world.debit("eu", "second", 10).await);
    world.reconcile_expecting("eu", 2, 1, 0).await;
    world.assert_settled(0).await;
}

/// Found by the simulation (`tollgate-sim`, seed 7, step 121,232 of a long run): a region
/// debits and reverses; before either is reconciled the account goes idle there, and the
/// take-back found the reversed credits back in the segment. Handed to another region, spent
/// and reconciled there first, they left the first region's debit an empty grant: parked. The
/// take-back now waits until the region's usage of the account is reconciled.
#[tokio::test]
async fn credits_a_reversal_gave_back_stay_in_the_region_until_it_is_reconciled() {
    let world = World::start(&["eu", "us"], 0, 10, 10).await;
    world.allocate("us").await;
    assert_eq!(world.held("us").await.0, 10 * MICROS);
    assert!(world.debit("us", "spent", 4).await);
    world.reverse("us", "undo-spent", "spent").await;

    // Idle long enough, but the debit and its reversal are still in the stream.
    world.clock.advance_ms(61_000);
    assert_eq!(
        world
            .node
            .take_back_idle(&mut Default::default())
            .await
            .unwrap(),
        0
    );
    assert_eq!(world.held("us").await.0, 10 * MICROS);
    world.allocate("eu").await;
    assert_eq!(world.held("eu").await.0, 0, "nothing is free for eu");
    world.assert_never_over_allocated().await;

    world.reconcile_expecting("us", 1, 1, 0).await;
    world.clock.advance_ms(61_000);
    assert!(
        world
            .node
            .take_back_idle(&mut Default::default())
            .await
            .unwrap()
            >= 1
    );
    assert_eq!(world.held("us").await.0, 0);
    world.allocate("eu").await;
    assert_eq!(world.held("eu").await.0, 10 * MICROS);
    assert!(world.debit("eu", "all", 10).await);
    world.node.reconcile_once(&region("eu")).await.unwrap();
    world.assert_settled(0).await;
}

/// Found by the simulation (`tollgate-sim`, seed 11, step 35,758): a reversal gives its draws
/// back to an expiring grant's segment, a later debit spends them from it before the grant
/// expires, and the region is reconciled only after the expiry. The ledger judged the refund at
/// reconciliation time, found the grant expired and sent the credits to a new refund grant; the
/// later debit found its grant short and was parked. The refund is now judged at the reversal's
/// time.
#[tokio::test]
async fn a_reversal_reconciled_after_its_grant_expired_still_refunds_that_grant() {
    let world = World::start(&["eu"], 0, 0, 10).await;
    let now = world.clock.now();
    let ends = Timestamp::from_millis(now.millis() + 60_000).unwrap();
    issue(
        &world.ledger,
        "expiring",
        10,
        GrantSource::Promo,
        Some(ends),
        now,
    )
    .await;
    world.allocate("eu").await;
    assert!(world.debit("eu", "first", 10).await);
    world.reverse("eu", "undo-first", "first").await;
    assert!(world.debit("eu", "second", 10).await);

    // Reconciled only after the grant's end.
    world.clock.advance_ms(61_000);
    world.reconcile_expecting("eu", 2, 1, 0).await;
    world.assert_settled(0).await;
    let snapshot = world.ledger.account(&acct()).await.unwrap();
    assert_eq!(snapshot.totals.debited.micros(), 20 * MICROS);
    assert_eq!(snapshot.totals.refunded.micros(), 10 * MICROS);
    let expiring = world
        .ledger
        .grant(&acct(), &GrantId::new("expiring").unwrap())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(expiring.grant.remaining, Credits::ZERO);
}

#[tokio::test]
async fn two_regions_never_hold_more_than_the_grants_and_an_idle_one_gives_back() {
    // A 15-credit grant, two regions targeted at 10 each: the second gets what is left.
    let world = World::start(&["eu", "us"], 0, 15, 10).await;
    world.allocate("eu").await;
    world.allocate("us").await;
    assert_eq!(world.held("eu").await.0, 10 * MICROS);
    assert_eq!(world.held("us").await.0, 5 * MICROS);
    world.assert_never_over_allocated().await;

    // eu spends all it has; the refill finds nothing free (us still holds 5).
    for n in 0..10 {
        assert!(world.debit("eu", &format!("eu-{n}"), 1).await);
    }
    assert!(!world.debit("eu", "eu-over", 1).await);
    world.node.reconcile_once(&region("eu")).await.unwrap();
    assert_eq!(world.held("eu").await.0, 0);
    world.assert_never_over_allocated().await;

    // us goes idle: the lifecycle takes its 5 back, and eu may have them.
    world.clock.advance_ms(61_000);
    let taken = world
        .node
        .take_back_idle(&mut Default::default())
        .await
        .unwrap();
    assert!(taken >= 1, "{taken}");
    assert_eq!(world.held("us").await.0, 0);
    assert_eq!(world.installed_outstanding("bought").await, 0);
    world.allocate("eu").await;
    assert_eq!(world.held("eu").await.0, 5 * MICROS);
    world.assert_never_over_allocated().await;
}

/// Two regions hold all of the account's 100 credits between them, so the authority has none
/// to hand out. A spend in eu larger than eu holds is still allowed: us has not used the account
/// (nor been given any of it) for longer than `move_idle_ms`, so the cold path takes back what
/// us holds and installs the shortfall in eu.
#[tokio::test]
async fn a_spend_beyond_what_the_region_and_the_authority_hold_takes_the_credits_of_an_idle_region()
{
    let world = World::start_within(&["eu", "us"], 0, 100, (50, 50), "2027-05-01T00:00:00Z").await;
    world.allocate("eu").await;
    world.allocate("us").await;
    assert_eq!(world.held("eu").await.0, 50 * MICROS);
    assert_eq!(world.held("us").await.0, 50 * MICROS);
    assert_eq!(world.installed_outstanding("bought").await, 100 * MICROS);

    world.clock.advance_ms(MOVE_IDLE_MS_DEFAULT + 1_000);
    assert!(
        world.spend_via_cold_path("eu", "large", 80).await,
        "eu held 50 of the 80: the spend went through the cold path"
    );
    let (us_pool, _) = world.held("us").await;
    assert!(
        us_pool < 50 * MICROS,
        "us gave its credits up, it holds {us_pool}"
    );
    world.assert_never_over_allocated().await;

    world.reconcile_expecting("eu", 1, 0, 0).await;
    world.assert_settled(20).await;
    world.assert_exact().await;
    // The counters say exactly what the regions hold once their usage is reconciled.
    let pools = world.held("eu").await.0 + world.held("us").await.0;
    assert_eq!(world.installed_outstanding("bought").await, pools);
    assert!(pools <= 20 * MICROS, "regions hold {pools} of 20");
}

/// The counter-case of the test above: us used the account less than `move_idle_ms` ago, so it
/// keeps its credits, and a spend in eu beyond what eu and the authority hold is refused (the
/// multi-region rule, docs/answer.md). Once us has been idle that long, the same spend is allowed.
#[tokio::test]
async fn a_region_that_used_the_account_recently_keeps_its_credits_and_a_spend_beyond_is_refused() {
    let world = World::start_within(&["eu", "us"], 0, 100, (50, 50), "2027-05-01T00:00:00Z").await;
    world.allocate("eu").await;
    world.allocate("us").await;
    // Both allocations are older than `move_idle_ms`: only us's usage keeps it busy.
    world.clock.advance_ms(MOVE_IDLE_MS_DEFAULT + 1_000);
    assert!(world.debit("us", "us-small", 1).await);
    world.reconcile_expecting("us", 1, 0, 0).await;
    assert_eq!(world.held("us").await.0, 49 * MICROS);

    world.clock.advance_ms(1_000);
    let short = 80 * MICROS - world.held("eu").await.0;
    assert_eq!(short, 30 * MICROS);
    let outcome = world
        .node
        .request_allocation(
            &region("eu"),
            &acct(),
            Some(&FeatureKey::new("chat").unwrap()),
            Credits::from_micros(short),
        )
        .await
        .unwrap();
    let AllocationOutcome::Allocated(allocation) = outcome else {
        panic!("{outcome:?}");
    };
    assert_eq!(
        allocation.unallocated,
        Credits::ZERO,
        "the authority holds nothing more"
    );
    assert_eq!(
        world.held("us").await.0,
        49 * MICROS,
        "us keeps its credits"
    );
    assert_eq!(world.held("eu").await.0, 50 * MICROS);
    assert!(
        !world.debit("eu", "large", 80).await,
        "80 is more than eu (50) and the authority (0) hold"
    );
    world.assert_never_over_allocated().await;

    // us has now been idle for longer than `move_idle_ms`: the same spend is allowed.
    world.clock.advance_ms(MOVE_IDLE_MS_DEFAULT);
    assert!(world.spend_via_cold_path("eu", "large-again", 80).await);
    assert!(world.held("us").await.0 < 49 * MICROS);
    world.reconcile_expecting("eu", 1, 0, 0).await;
    world.assert_settled(19).await;
    world.assert_exact().await;
}

#[tokio::test]
async fn overdraft_room_is_split_between_regions_and_shrinks_with_the_limit() {
    let world = World::start(&["eu", "us"], 10, 0, 10).await;
    world.allocate("eu").await;
    world.allocate("us").await;
    assert_eq!(world.held("eu").await, (0, 5 * MICROS));
    assert_eq!(world.held("us").await, (0, 5 * MICROS));
    // Asking again adds nothing: each region has its share.
    world.allocate("eu").await;
    assert_eq!(world.held("eu").await.1, 5 * MICROS);
    world.assert_never_over_allocated().await;

    // eu spends 3 into the overdraft; the ledger records the debt when it reconciles.
    assert!(world.debit("eu", "od-1", 3).await);
    world.node.reconcile_once(&region("eu")).await.unwrap();
    assert_eq!(
        world.ledger.account(&acct()).await.unwrap().debt.micros(),
        3 * MICROS
    );

    // The limit drops to 4: each region's room shrinks to its share of 2 (eu has used 3
    // already, so its room is what its share leaves above that).
    world
        .ledger
        .update_account(
            UpdateAccount {
                key: key("lower"),
                account: acct(),
                overdraft_limit: Some(Credits::from_micros(4 * MICROS)),
                metadata: Metadata::default(),
                replace_metadata: false,
            },
            world.clock.now(),
        )
        .await
        .unwrap();
    world.node.rebalance(&acct()).await.unwrap();
    assert_eq!(world.held("us").await.1, 2 * MICROS);
    assert!(world.held("eu").await.1 <= 2 * MICROS);
    // us can spend its 2, not 3.
    assert!(!world.debit("us", "od-us-3", 3).await);
    assert!(world.debit("us", "od-us-2", 2).await);
}

#[tokio::test]
async fn a_spend_beyond_the_regions_share_of_overdraft_gets_the_room_the_authority_holds() {
    let world = World::start(&["eu", "us"], 10, 0, 10).await;
    world.allocate("eu").await;
    assert_eq!(world.held("eu").await, (0, 5 * MICROS));
    // A spend of 8 in eu: its share (5) cannot pay, and us holds nothing yet; the cold path
    // brings the 3 missing out of the 5 the authority still holds, and says 2 are left.
    let outcome = world
        .node
        .request_allocation(
            &region("eu"),
            &acct(),
            None,
            Credits::from_micros(3 * MICROS),
        )
        .await
        .unwrap();
    let AllocationOutcome::Allocated(allocation) = outcome else {
        panic!("{outcome:?}");
    };
    assert_eq!(allocation.overdraft_room, Credits::from_micros(8 * MICROS));
    assert_eq!(allocation.unallocated, Credits::from_micros(2 * MICROS));
    assert!(world.debit("eu", "od-8", 8).await);
    world.assert_never_over_allocated().await;
    // us gets what is left, never more than the limit.
    world.allocate("us").await;
    assert_eq!(world.held("us").await, (0, 2 * MICROS));
    world.assert_never_over_allocated().await;
}

#[tokio::test]
async fn install_intents_left_by_a_crash_are_replayed_once_or_kept_on_the_safe_side() {
    let world = World::start(&["eu"], 0, 100, 10).await;
    let spec = |amount: i64| SegmentSpec {
        grant_id: GrantId::new("bought").unwrap(),
        amount: Credits::from_micros(amount * MICROS),
        priority: 0,
        effective_at: world.clock.now(),
        expires_at: None,
        scope: Scope::All,
    };
    let intent = |id: &str, amount: i64, at: Timestamp| InstallIntent {
        key: key(id),
        region: region("eu"),
        account: acct(),
        spec: spec(amount),
        created_at: at,
    };
    let state = world.node.state();

    // Crashed before the region was called: the counter says 3, the region has nothing.
    let never_sent = intent("alloc:never-sent", 3, world.clock.now());
    state.begin_install(&never_sent).await.unwrap();
    // Crashed after the region installed, before the intent was cleared.
    let sent = intent("alloc:sent", 4, world.clock.now());
    state.begin_install(&sent).await.unwrap();
    world
        .store("eu")
        .install_segment(&acct(), &sent.key, &sent.spec, world.clock.now())
        .await
        .unwrap();
    assert_eq!(world.held("eu").await.0, 4 * MICROS);
    assert_eq!(world.installed_outstanding("bought").await, 7 * MICROS);

    // Recovery replays both with their keys: the missing one lands, the other is not doubled.
    assert_eq!(world.node.recover_installs().await.unwrap(), 2);
    assert_eq!(world.held("eu").await.0, 7 * MICROS);
    assert_eq!(world.installed_outstanding("bought").await, 7 * MICROS);
    assert!(state.open_installs(10).await.unwrap().is_empty());
    // A second pass has nothing to do.
    assert_eq!(world.node.recover_installs().await.unwrap(), 0);

    // An intent older than the region's idempotency retention cannot be replayed safely:
    // it is dropped and its counter kept (the region may be under-allocated, never over).
    let stale_at =
        Timestamp::from_millis(world.clock.now().millis() - RETAIN_MS_DEFAULT - 1).unwrap();
    let stale = intent("alloc:stale", 2, stale_at);
    state.begin_install(&stale).await.unwrap();
    assert_eq!(world.node.recover_installs().await.unwrap(), 1);
    assert_eq!(world.held("eu").await.0, 7 * MICROS);
    assert_eq!(world.installed_outstanding("bought").await, 9 * MICROS);
    world.assert_never_over_allocated().await;
}

/// The embedded node's region lives in memory and starts again empty after a restart, while
/// the counters still say it holds what it held. Once they are forgotten, the next allocation
/// hands out the ledger's remainder again in burn-down order (the promo's rest before the
/// purchase) and the overdraft room again; an install intent left open is not replayed into
/// the new region.
#[tokio::test]
async fn a_region_that_restarted_empty_is_allocated_the_ledgers_credits_again() {
    let world = World::start(&["eu"], 2, 100, 10).await;
    let now = world.clock.now();
    issue(&world.ledger, "promo", 10, GrantSource::Promo, None, now).await;
    // The only region holds everything: both grants and the whole overdraft limit.
    world.allocate("eu").await;
    assert_eq!(world.held("eu").await, (110 * MICROS, 2 * MICROS));
    assert!(world.debit("eu", "d1", 3).await);
    world.reconcile_expecting("eu", 1, 0, 0).await;
    let open = InstallIntent {
        key: key("alloc:open"),
        region: region("eu"),
        account: acct(),
        spec: SegmentSpec {
            grant_id: GrantId::new("bought").unwrap(),
            amount: Credits::from_micros(5 * MICROS),
            priority: 50,
            effective_at: now,
            expires_at: None,
            scope: Scope::All,
        },
        created_at: now,
    };
    world.node.state().begin_install(&open).await.unwrap();

    let restarted = Arc::new(MemoryRegionStore::new(RETAIN_MS_DEFAULT));
    let node = Authority::new(
        Arc::clone(&world.ledger),
        world.node.state().clone(),
        BTreeMap::from([(region("eu"), Arc::clone(&restarted))]),
        world.clock.clone(),
        world.node.settings().clone(),
    );
    let forgotten = node.forget_region_holdings(&region("eu")).await.unwrap();
    assert_eq!(
        (
            forgotten.counters,
            forgotten.install_intents,
            forgotten.accounts,
            forgotten.usage_seqs
        ),
        (3, 1, 1, 1),
        "promo, bought and the overdraft room; the open intent; the account; its record number"
    );
    let state = node.state();
    assert!(state.allocations(&acct()).await.unwrap().is_empty());
    assert!(state.open_installs(10).await.unwrap().is_empty());
    assert_eq!(state.usage_seq(&region("eu"), &acct()).await.unwrap(), 0);
    assert_eq!(node.recover_installs().await.unwrap(), 0);

    let outcome = node
        .request_allocation(&region("eu"), &acct(), None, Credits::ZERO)
        .await
        .unwrap();
    assert!(
        matches!(outcome, AllocationOutcome::Allocated(_)),
        "{outcome:?}"
    );
    let view = restarted.view(&acct(), world.clock.now()).await.unwrap();
    let mut segments: Vec<(String, i64, u32)> = view
        .segments
        .iter()
        .map(|s| (s.grant_id.to_string(), s.remaining.micros(), s.priority))
        .collect();
    segments.sort();
    assert_eq!(
        segments,
        vec![
            ("bought".into(), 100 * MICROS, 50),
            ("promo".into(), 7 * MICROS, 30)
        ],
        "what the ledger says remains, nothing counted twice"
    );
    assert_eq!(view.overdraft_limit.micros(), 2 * MICROS);
    let spent = restarted
        .debit(&DebitCommand {
            account: acct(),
            key: key("d2"),
            feature: FeatureKey::new("chat").unwrap(),
            cost: Credits::from_micros(8 * MICROS),
            now: world.clock.now(),
            actor: None,
            price: PriceTag::at(1, PriceRule::Default),
            forced: false,
        })
        .await
        .unwrap();
    let DebitOutcome::Allowed(allowed) = spent else {
        panic!("{spent:?}");
    };
    let draws: Vec<(String, i64)> = allowed
        .draws
        .iter()
        .map(|d| (d.grant_id.to_string(), d.amount.micros()))
        .collect();
    assert_eq!(
        draws,
        vec![("promo".into(), 7 * MICROS), ("bought".into(), MICROS)],
        "burn-down order: the promo's rest first"
    );
    assert!(
        node.forget_region_holdings(&region("nowhere"))
            .await
            .is_err(),
        "a region the authority does not drive"
    );
}

fn ts(text: &str) -> Timestamp {
    Timestamp::parse_rfc3339(text).unwrap()
}

fn credits(text: &str) -> Credits {
    Credits::parse(text).unwrap()
}

fn monthly_plan(id: &str, tier: u32, amount: &str) -> Plan {
    Plan {
        id: PlanId::new(id).unwrap(),
        description: format!("{id} plan"),
        tier,
        grants: vec![PlanGrant {
            key: "monthly".to_owned(),
            amount: credits(amount),
            period: Recurrence::new(ts("2027-01-01T00:00:00Z"), PeriodUnit::Month, 1)
                .unwrap()
                .period,
            rollover: RolloverPolicy::None,
            priority: 10,
            scope: Scope::All,
        }],
    }
}

impl World {
    /// Moves the clock to `at` plus two minutes (past the watermark lateness) and runs a
    /// reconciliation and a lifecycle pass there.
    async fn pass_at(&self, at: &str) {
        self.clock
            .set(Timestamp::from_millis(ts(at).millis() + 120_000).unwrap());
        self.node.reconcile_all(10).await.unwrap();
        self.node.tick().await.unwrap();
    }

    async fn change(
        &self,
        at: &str,
        key: &str,
        plan: &str,
        proration: Proration,
    ) -> PlanChangeReport {
        self.clock.set(ts(at));
        self.node
            .change_plan(
                &acct(),
                &PlanChange {
                    key: key.to_owned(),
                    plan: Some(PlanId::new(plan).unwrap()),
                    proration,
                    reinstate_grace_ms: 2 * 24 * 3_600_000,
                },
            )
            .await
            .unwrap()
    }

    async fn entries(&self) -> Vec<(EntryKind, String, Credits)> {
        let page = self
            .ledger
            .entries(
                &EntryFilter::account(acct()),
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

#[tokio::test]
async fn an_upgrade_mid_period_grants_the_prorated_difference_entry_by_entry() {
    let world = World::start_at(&["eu"], 0, 0, 1_000, "2027-01-01T00:00:00Z").await;
    world
        .node
        .define_plan(&monthly_plan("basic", 1, "100"))
        .await
        .unwrap();
    world
        .node
        .define_plan(&monthly_plan("pro", 2, "300"))
        .await
        .unwrap();
    // Defining the same plan again is a replay; another with the same id a conflict.
    world
        .node
        .define_plan(&monthly_plan("basic", 1, "100"))
        .await
        .unwrap();
    assert!(world
        .node
        .define_plan(&monthly_plan("basic", 1, "101"))
        .await
        .is_err());

    let assigned = world
        .change(
            "2027-01-01T00:00:00Z",
            "assign",
            "basic",
            Proration::NextPeriod,
        )
        .await;
    assert!(!assigned.upgrade);
    assert_eq!(assigned.starts_at, Some(ts("2027-01-01T00:00:00Z")));
    let basic = &assigned.schedules[0];
    world.pass_at("2027-01-01T00:00:00Z").await;
    world.allocate("eu").await;
    world.clock.set(ts("2027-01-10T00:00:00Z"));
    assert!(world.debit("eu", "jan-10", 30).await);
    world.node.reconcile_all(10).await.unwrap();

    // Jan 16, 00:00: 16 of January's 31 days are ahead. (300 − 100) × 16 / 31 = 103.2258064…,
    // rounded down to 103.225806, expiring with the period on Feb 1.
    let upgraded = world
        .change(
            "2027-01-16T00:00:00Z",
            "upgrade",
            "pro",
            Proration::ProratedNow,
        )
        .await;
    assert!(upgraded.upgrade);
    assert_eq!(upgraded.previous, Some(PlanId::new("basic").unwrap()));
    assert_eq!(upgraded.starts_at, Some(ts("2027-02-01T00:00:00Z")));
    assert_eq!(upgraded.granted.len(), 1, "{upgraded:?}");
    let (prorated, amount) = &upgraded.granted[0];
    assert_eq!(*amount, credits("103.225806"));
    let pro = &upgraded.schedules[0];
    // A retried change with the same key is a no-op: the plan is already pro.
    let again = world
        .change(
            "2027-01-16T00:00:05Z",
            "upgrade",
            "pro",
            Proration::ProratedNow,
        )
        .await;
    assert!(again.granted.is_empty() && again.schedules.is_empty());

    world.pass_at("2027-02-01T00:00:00Z").await;
    world.clock.set(ts("2027-02-05T00:00:00Z"));
    assert!(world.debit("eu", "feb-05", 50).await);
    world.pass_at("2027-03-01T00:00:00Z").await;

    use EntryKind::{Debit, Expire, Grant};
    let e = |kind, grant: &str, amount: &str| (kind, grant.to_owned(), credits(amount));
    let p = |schedule: &str, k: u32| format!("{schedule}.p{k}");
    assert_eq!(
        world.entries().await,
        vec![
            e(Grant, &p(basic, 0), "100"),
            e(Debit, &p(basic, 0), "30"),
            e(Grant, prorated.as_str(), "103.225806"),
            // Feb 1: basic's January grant closes (no rollover), the prorated grant expires,
            // pro's first full month begins; basic issues no February grant.
            e(Expire, &p(basic, 0), "70"),
            e(Grant, &p(pro, 0), "300"),
            e(Expire, prorated.as_str(), "103.225806"),
            e(Debit, &p(pro, 0), "50"),
            e(Expire, &p(pro, 0), "250"),
            e(Grant, &p(pro, 1), "300"),
        ]
    );
    world.assert_never_over_allocated().await;
}

#[tokio::test]
async fn credits_that_expired_just_before_an_upgrade_are_reinstated() {
    let world = World::start_at(&["eu"], 0, 0, 1_000, "2027-01-01T00:00:00Z").await;
    world
        .node
        .define_plan(&monthly_plan("basic", 1, "100"))
        .await
        .unwrap();
    world
        .node
        .define_plan(&monthly_plan("pro", 2, "300"))
        .await
        .unwrap();
    let assigned = world
        .change(
            "2027-01-01T00:00:00Z",
            "assign",
            "basic",
            Proration::NextPeriod,
        )
        .await;
    let basic = &assigned.schedules[0];
    world.pass_at("2027-01-01T00:00:00Z").await;
    // January's 100 go unused and expire on Feb 1; February's grant arrives.
    world.pass_at("2027-02-01T00:00:00Z").await;

    // Feb 2, 12:00, within the two-day grace: "my credits expired yesterday and I upgraded
    // today". 26.5 of February's 28 days are ahead: 200 × 26.5 / 28 = 189.285714 (down).
    let upgraded = world
        .change(
            "2027-02-02T12:00:00Z",
            "upgrade",
            "pro",
            Proration::ProratedNow,
        )
        .await;
    assert!(upgraded.upgrade);
    let granted: Vec<(String, Credits)> = upgraded
        .granted
        .iter()
        .map(|(id, amount)| (id.to_string(), *amount))
        .collect();
    assert_eq!(granted.len(), 2, "{granted:?}");
    assert_eq!(granted[0].1, credits("189.285714"));
    assert!(granted[1].0.starts_with(&format!("{basic}.p0.reinstated.")));
    assert_eq!(granted[1].1, credits("100"));

    use EntryKind::{Expire, Grant};
    let e = |kind, grant: &str, amount: &str| (kind, grant.to_owned(), credits(amount));
    assert_eq!(
        world.entries().await,
        vec![
            e(Grant, &format!("{basic}.p0"), "100"),
            e(Expire, &format!("{basic}.p0"), "100"),
            e(Grant, &format!("{basic}.p1"), "100"),
            e(Grant, &granted[0].0, "189.285714"),
            e(Grant, &granted[1].0, "100"),
        ]
    );
    let snapshot = world.ledger.account(&acct()).await.unwrap();
    assert_eq!(snapshot.balance, credits("389.285714"));
    // A downgrade back to basic grants nothing now and reinstates nothing.
    let down = world
        .change(
            "2027-02-03T00:00:00Z",
            "downgrade",
            "basic",
            Proration::ProratedNow,
        )
        .await;
    assert!(!down.upgrade);
    assert!(down.granted.is_empty());
}

#[tokio::test]
async fn debt_run_up_before_a_grant_and_reconciled_after_it_is_settled_from_that_grant() {
    let world = World::start(&["eu"], 10, 0, 10).await;
    world.allocate("eu").await;
    // 4 into overdraft in the region; the usage is not reconciled yet.
    assert!(world.debit("eu", "before-the-grant", 4).await);
    world.clock.advance_ms(1_000);
    // A purchase while that usage is on its way: the ledger has no debt to settle yet.
    world.buy(20).await;
    world.node.rebalance(&acct()).await.unwrap();
    assert_eq!(world.held("eu").await, (20 * MICROS, 6 * MICROS));
    world.clock.advance_ms(1_000);
    world.node.reconcile_once(&region("eu")).await.unwrap();
    // Had the usage arrived first, the purchase would have settled the debt: it does now.
    let snapshot = world.ledger.account(&acct()).await.unwrap();
    assert_eq!(snapshot.debt, Credits::ZERO);
    assert_eq!(snapshot.balance.micros(), 16 * MICROS);
    let bought = world
        .ledger
        .grant(&acct(), &GrantId::new("bought").unwrap())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(bought.grant.remaining.micros(), 16 * MICROS);
    // The region gave 4 of the grant back and holds the whole overdraft room again: what it
    // can spend in total did not move.
    assert_eq!(world.held("eu").await, (16 * MICROS, 10 * MICROS));
    let settles: Vec<_> = world
        .entries()
        .await
        .into_iter()
        .filter(|(kind, _, _)| *kind == EntryKind::Settle)
        .collect();
    assert_eq!(settles.len(), 1, "{settles:?}");
    // Reconciling again settles nothing twice.
    world.node.reconcile_once(&region("eu")).await.unwrap();
    assert_eq!(
        world.ledger.account(&acct()).await.unwrap().debt,
        Credits::ZERO
    );
    world.assert_exact().await;
}

#[tokio::test]
async fn a_key_reused_after_the_region_forgot_it_is_charged_and_its_reversal_refunds_that_decision()
{
    let world = World::start(&["eu"], 0, 0, 10).await;
    world.buy(100).await;
    world.allocate("eu").await;
    assert!(world.debit("eu", "nightly-job", 2).await);
    world.reconcile_expecting("eu", 1, 0, 0).await;
    // A day and more later the region has forgotten the key; the caller reuses it for
    // another spend, which the region charges as new.
    world.clock.advance_ms(RETAIN_MS_DEFAULT + 60_000);
    assert!(world.debit("eu", "nightly-job", 5).await);
    world.reconcile_expecting("eu", 1, 0, 0).await;
    let balance = |world: &World| {
        let ledger = Arc::clone(&world.ledger);
        async move { ledger.account(&acct()).await.unwrap().balance.micros() }
    };
    assert_eq!(
        balance(&world).await,
        93 * MICROS,
        "both spends are charged"
    );
    // The region reverses the spend it knows under that key: the second one.
    world.reverse("eu", "undo-nightly", "nightly-job").await;
    world.reconcile_expecting("eu", 0, 1, 0).await;
    assert_eq!(balance(&world).await, 98 * MICROS);
    world.assert_exact().await;
}

#[tokio::test]
async fn a_reversal_after_a_partial_refund_refunds_the_rest_and_the_region_returns_the_difference()
{
    let world = World::start(&["eu"], 0, 0, 10).await;
    world.buy(100).await;
    world.allocate("eu").await;
    assert!(world.debit("eu", "job", 10).await);
    world.reconcile_expecting("eu", 1, 0, 0).await;
    // Support refunds 4 of it; the authority hands the 4 out again.
    let debit = tollgate_authority::reconciler::debit_id(&region("eu"), &key("job")).unwrap();
    let refunded = world
        .ledger
        .refund(
            tollgate_core::command::Refund {
                key: key("goodwill"),
                account: acct(),
                debit,
                amount: Credits::from_micros(4 * MICROS),
                refund_grant_id: None,
                refund_grant_expires_at: None,
                memo: Memo::default(),
            },
            world.clock.now(),
        )
        .await
        .unwrap();
    assert!(refunded.is_ok(), "{refunded:?}");
    world.node.rebalance(&acct()).await.unwrap();
    assert_eq!(world.held("eu").await.0, 94 * MICROS);
    // Then the caller reverses the whole spend in the region, which gives all 10 back.
    world.reverse("eu", "undo-job", "job").await;
    assert_eq!(world.held("eu").await.0, 104 * MICROS);
    // The reversal refunds the 6 left; the region returns the 4 refunded already.
    world.reconcile_expecting("eu", 0, 1, 0).await;
    let snapshot = world.ledger.account(&acct()).await.unwrap();
    assert_eq!(snapshot.balance.micros(), 100 * MICROS);
    assert_eq!(world.held("eu").await.0, 100 * MICROS);
    world.assert_exact().await;
    // Reconciling again changes nothing.
    world.reconcile_expecting("eu", 0, 0, 0).await;
    assert_eq!(world.held("eu").await.0, 100 * MICROS);
}

#[tokio::test]
async fn late_debt_waits_for_the_grant_issued_first_rather_than_settle_from_a_later_one() {
    let world = World::start(&["eu", "us"], 10, 0, 10).await;
    world.allocate("eu").await;
    world.allocate("us").await;
    // Debt run up in eu, not reconciled yet.
    assert!(world.debit("eu", "before-the-grants", 3).await);
    world.clock.advance_ms(1_000);
    // A purchase, all of it handed to us, which then spends from it (not reconciled either).
    world.buy(10).await;
    world.allocate("us").await;
    assert_eq!(world.held("us").await.0, 10 * MICROS);
    assert!(world.debit("us", "from-the-purchase", 1).await);
    world.clock.advance_ms(1_000);
    // A second grant, which stays with the authority.
    issue(
        &world.ledger,
        "later",
        10,
        GrantSource::Promo,
        None,
        world.clock.now(),
    )
    .await;
    let remaining = |id: &'static str| {
        let ledger = Arc::clone(&world.ledger);
        async move {
            ledger
                .grant(&acct(), &GrantId::new(id).unwrap())
                .await
                .unwrap()
                .unwrap()
                .grant
                .remaining
                .micros()
        }
    };
    // In event order the purchase settled the 3 of debt when it was issued. Its credits are
    // with us, whose own usage is not reconciled, so the debt waits: the later grant does not
    // settle it in the purchase's place.
    world.node.reconcile_once(&region("eu")).await.unwrap();
    assert_eq!(
        world.ledger.account(&acct()).await.unwrap().debt.micros(),
        3 * MICROS
    );
    assert_eq!(remaining("later").await, 10 * MICROS);
    // Once us is reconciled, the purchase settles it.
    world.node.reconcile_once(&region("us")).await.unwrap();
    world.node.reconcile_once(&region("eu")).await.unwrap();
    assert_eq!(
        world.ledger.account(&acct()).await.unwrap().debt,
        Credits::ZERO
    );
    assert_eq!(remaining("bought").await, 6 * MICROS);
    assert_eq!(remaining("later").await, 10 * MICROS);
    world.assert_exact().await;
}

#[tokio::test]
async fn a_reversal_reconciled_with_late_debt_refunds_after_the_grant_settled_that_debt() {
    let world = World::start(&["eu"], 10, 0, 10).await;
    world.allocate("eu").await;
    assert!(world.debit("eu", "before-the-grant", 3).await);
    world.clock.advance_ms(1_000);
    world.buy(20).await;
    world.node.rebalance(&acct()).await.unwrap();
    world.clock.advance_ms(1_000);
    // The spend is reversed before either reaches the ledger: one batch holds both.
    world.reverse("eu", "undo", "before-the-grant").await;
    world.node.reconcile_once(&region("eu")).await.unwrap();
    // In event order the purchase settled the 3 of debt when it was issued, so the reversal
    // found no debt to pay back and its 3 came back as a refund grant. Applied the other way
    // round the refund would have paid the debt and the purchase stayed whole: the same
    // balance, in the wrong grants.
    let snapshot = world.ledger.account(&acct()).await.unwrap();
    assert_eq!(
        (snapshot.balance.micros(), snapshot.debt),
        (20 * MICROS, Credits::ZERO)
    );
    let bought = world
        .ledger
        .grant(&acct(), &GrantId::new("bought").unwrap())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(bought.grant.remaining.micros(), 17 * MICROS);
    let refunds: Vec<_> = world
        .ledger
        .grants_with_credits(&acct(), 10)
        .await
        .unwrap()
        .into_iter()
        .filter(|g| g.source == GrantSource::Refund)
        .map(|g| g.remaining.micros())
        .collect();
    assert_eq!(refunds, vec![3 * MICROS]);
    world.assert_exact().await;
}
