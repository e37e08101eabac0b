//! Property tests of the rules: each names a rule and would fail if that rule were wrong.

use std::collections::{BTreeMap, BTreeSet};

use chrono::{Datelike, Timelike};
use proptest::prelude::*;
use rust_decimal::Decimal;
use tollgate_core::{
    cost, plan_burn, AccountBook, BookError, BurnPlan, BurnRequest, Credits, DebitId, FeatureKey,
    Grant, GrantId, GrantSource, HoldId, PeriodUnit, Quantity, Rate, Recurrence, RefundGrantTerms,
    Reserved, RolloverPolicy, Scope, Timestamp,
};

fn at(millis: i64) -> Timestamp {
    Timestamp::from_millis(millis).expect("test times are in range")
}

fn feature(index: u8) -> FeatureKey {
    FeatureKey::new(format!("f{index}")).expect("valid feature")
}

/// A grant with random remaining, priority, window and scope over features f0..f2.
fn grant_strategy(index: usize) -> impl Strategy<Value = Grant> {
    (
        1_i64..=5_000_000,
        0.0_f64..=1.0,
        0_u32..=3,
        0_i64..=1_000,
        prop::option::of(1_i64..=2_000),
        prop::option::of(prop::collection::btree_set(0_u8..3, 1..=2)),
        prop::sample::select(GrantSource::ALL.to_vec()),
    )
        .prop_map(
            move |(amount, used, priority, effective, lifetime, scope, source)| {
                let amount = Credits::from_micros(amount);
                let mut grant = Grant::new(
                    GrantId::new(format!("g{index:02}")).unwrap(),
                    amount,
                    source,
                    at(effective),
                )
                .with_priority(priority);
                grant.remaining = Credits::from_micros((amount.micros() as f64 * used) as i64);
                grant.expires_at = lifetime.map(|lifetime| at(effective + lifetime));
                if let Some(features) = scope {
                    grant.scope =
                        Scope::Features(features.into_iter().map(feature).collect::<BTreeSet<_>>());
                }
                grant
            },
        )
}

fn grants_strategy() -> impl Strategy<Value = Vec<Grant>> {
    (0_usize..=8).prop_flat_map(|count| (0..count).map(grant_strategy).collect::<Vec<_>>())
}

/// Holds already placed: a random share of some grants' remaining, and some overdraft.
fn with_reservations(grants: Vec<Grant>) -> impl Strategy<Value = (Vec<Grant>, Reserved)> {
    let count = grants.len();
    (
        Just(grants),
        prop::collection::vec(0.0_f64..=1.0, count),
        0_i64..=1_000_000,
    )
        .prop_map(|(grants, shares, overdraft)| {
            let mut reserved = Reserved::default();
            let draws = grants
                .iter()
                .zip(shares)
                .map(|(grant, share)| tollgate_core::Draw {
                    grant_id: grant.id.clone(),
                    amount: Credits::from_micros((grant.remaining.micros() as f64 * share) as i64),
                })
                .collect();
            reserved
                .add(&BurnPlan {
                    draws,
                    overdraft: Credits::from_micros(overdraft),
                })
                .unwrap();
            (grants, reserved)
        })
}

/// A time for the question: anywhere, or exactly on a grant's start or expiry, where
/// off-by-one mistakes live.
#[derive(Clone, Debug)]
enum TimePick {
    Any(i64),
    Boundary(usize),
}

impl TimePick {
    fn resolve(&self, grants: &[Grant]) -> i64 {
        let boundaries: Vec<i64> = grants
            .iter()
            .flat_map(|g| {
                [
                    Some(g.effective_at.millis()),
                    g.expires_at.map(Timestamp::millis),
                ]
            })
            .flatten()
            .collect();
        match *self {
            TimePick::Any(t) => t,
            TimePick::Boundary(_) if boundaries.is_empty() => 0,
            TimePick::Boundary(pick) => boundaries[pick % boundaries.len()],
        }
    }
}

fn available(grant: &Grant, reserved: &Reserved) -> Credits {
    grant
        .remaining
        .saturating_sub_floor_zero(reserved.on_grant(&grant.id))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    /// Draws never exceed a grant's available credits, never touch an ineligible grant, follow
    /// burn-down order greedily, and sum exactly to the cost; a refusal reports the true shortfall.
    #[test]
    fn burn_down_plans_are_exact_and_ordered(
        (grants, reserved) in grants_strategy().prop_flat_map(with_reservations),
        feature_index in 0_u8..3,
        t_pick in prop_oneof![(0_i64..=3_000).prop_map(TimePick::Any), any::<usize>().prop_map(TimePick::Boundary)],
        cost_micros in 0_i64..=20_000_000,
        overdraft_limit in 0_i64..=3_000_000,
        debt_share in 0.0_f64..=1.0,
    ) {
        let feature = feature(feature_index);
        let t = t_pick.resolve(&grants);
        let debt = Credits::from_micros((overdraft_limit as f64 * debt_share) as i64);
        let request = BurnRequest {
            feature: &feature,
            at: at(t),
            cost: Credits::from_micros(cost_micros),
            overdraft_limit: Credits::from_micros(overdraft_limit),
            debt,
        };
        let by_id: BTreeMap<&GrantId, &Grant> = grants.iter().map(|g| (&g.id, g)).collect();
        let mut eligible: Vec<&Grant> = grants
            .iter()
            .filter(|g| g.effective_at <= at(t) && g.expires_at.is_none_or(|e| at(t) < e) && g.scope.covers(&feature))
            .filter(|g| available(g, &reserved).is_positive())
            .collect();
        // An oracle written apart from the crate's `burn_order`: priority, then expiry with
        // "never" last, then effective time, then id.
        eligible.sort_by_key(|g| (g.priority, g.expires_at.is_none(), g.expires_at, g.effective_at, g.id.clone()));
        let eligible_total: i64 = eligible.iter().map(|g| available(g, &reserved).micros()).sum();
        let room = (overdraft_limit - debt.micros() - reserved.overdraft().micros()).max(0);

        match plan_burn(&grants, &reserved, &request) {
            Ok(plan) => {
                prop_assert_eq!(plan.total().unwrap(), request.cost, "draws and overdraft sum to the cost");
                prop_assert!(plan.overdraft.micros() <= room, "overdraft stays within the limit");
                let drawn: Vec<&GrantId> = plan.draws.iter().map(|d| &d.grant_id).collect();
                let expected: Vec<&GrantId> = eligible.iter().take(drawn.len()).map(|g| &g.id).collect();
                prop_assert_eq!(&drawn, &expected, "draws follow burn-down order over eligible grants");
                for (position, draw) in plan.draws.iter().enumerate() {
                    let grant = by_id[&draw.grant_id];
                    prop_assert!(draw.amount.is_positive());
                    prop_assert!(draw.amount <= available(grant, &reserved), "never more than available");
                    if position + 1 < plan.draws.len() || plan.overdraft.is_positive() {
                        prop_assert_eq!(draw.amount, available(grant, &reserved), "earlier grants are used up first");
                    }
                }
                if plan.overdraft.is_positive() {
                    prop_assert_eq!(drawn.len(), eligible.len(), "overdraft only once every grant is used up");
                }
            }
            Err(refusal) => {
                prop_assert!(eligible_total + room < cost_micros, "refused although it could pay");
                prop_assert_eq!(refusal.available.micros(), eligible_total + room);
                prop_assert_eq!(refusal.shortfall.micros(), cost_micros - eligible_total - room);
            }
        }
    }

    /// Rollover conserves credits: carried + expired = remaining, and the carried part respects the policy.
    #[test]
    fn rollover_conserves_credits(
        remaining in 0_i64..=1_000_000_000_000,
        policy_kind in 0_u8..4,
        cap in 0_i64..=1_000_000_000_000,
        percent_basis_points in 0_i64..=10_000,
        capped in any::<bool>(),
    ) {
        let cap = Credits::from_micros(cap);
        let policy = match policy_kind {
            0 => RolloverPolicy::None,
            1 => RolloverPolicy::Full,
            2 => RolloverPolicy::Max { cap },
            _ => RolloverPolicy::Percent { percent: Decimal::new(percent_basis_points, 2), cap: capped.then_some(cap) },
        };
        let remaining = Credits::from_micros(remaining);
        let split = policy.split(remaining);
        prop_assert_eq!(split.carried.checked_add(split.expired).unwrap(), remaining);
        prop_assert!(!split.carried.is_negative() && !split.expired.is_negative());
        match policy {
            RolloverPolicy::None => prop_assert!(split.carried.is_zero()),
            RolloverPolicy::Full => prop_assert_eq!(split.carried, remaining),
            RolloverPolicy::Max { cap } => prop_assert_eq!(split.carried, remaining.min(cap)),
            RolloverPolicy::Percent { cap: limit, .. } => {
                // Rounded down: never carries more than the exact share.
                let exact = i128::from(remaining.micros()) * i128::from(percent_basis_points);
                let carried = i128::from(split.carried.micros()) * 10_000;
                prop_assert!(carried <= exact);
                if limit.is_none_or(|limit| split.carried < limit) {
                    prop_assert!(exact - carried < 10_000, "rounded down by less than one micro-credit");
                }
            }
        }
    }

    /// Recurring periods tile time: each ends where the next starts, every instant belongs to
    /// exactly one period, and month periods keep the anchor's day, clamped to month end.
    #[test]
    fn recurring_periods_tile_time(
        year in 1990_i32..=2090,
        month in 1_u32..=12,
        day in prop::sample::select(vec![1_u32, 15, 28, 29, 30, 31]),
        hour in 0_u32..24,
        unit in prop::sample::select(vec![PeriodUnit::Day, PeriodUnit::Week, PeriodUnit::Month, PeriodUnit::Year]),
        count in 1_u32..=3,
        index in 0_u64..=60,
        offset_share in 0.0_f64..1.0,
    ) {
        let last_day = chrono::NaiveDate::from_ymd_opt(year, month, 1).unwrap()
            .checked_add_months(chrono::Months::new(1)).unwrap().pred_opt().unwrap().day();
        let day = day.min(last_day);
        let anchor_time = chrono::NaiveDate::from_ymd_opt(year, month, day).unwrap().and_hms_opt(hour, 0, 0).unwrap().and_utc();
        let recurrence = Recurrence::new(Timestamp::from_datetime(anchor_time).unwrap(), unit, count).unwrap();
        let (start, end) = recurrence.period(index).unwrap();
        let (next_start, _) = recurrence.period(index + 1).unwrap();
        prop_assert!(start < end, "a period is never empty");
        prop_assert_eq!(end, next_start, "no gap and no overlap");
        prop_assert_eq!(recurrence.index_at(start).unwrap(), Some(index));
        prop_assert_eq!(recurrence.index_at(at(end.millis() - 1)).unwrap(), Some(index));
        let inside = at(start.millis() + ((end.millis() - start.millis()) as f64 * offset_share) as i64);
        prop_assert_eq!(recurrence.index_at(inside).unwrap(), Some(index));
        if index == 0 {
            prop_assert_eq!(recurrence.index_at(at(start.millis() - 1)).unwrap(), None);
        }
        let start_time = start.to_datetime();
        prop_assert_eq!(start_time.hour(), hour, "the time of day is kept");
        if matches!(unit, PeriodUnit::Month | PeriodUnit::Year) {
            let month_days = chrono::NaiveDate::from_ymd_opt(start_time.year(), start_time.month(), 1).unwrap()
                .checked_add_months(chrono::Months::new(1)).unwrap().pred_opt().unwrap().day();
            prop_assert_eq!(start_time.day(), day.min(month_days), "the anchor's day, clamped to month end");
        }
    }

    /// The cost is the smallest micro-credit amount at or above rate × quantity.
    #[test]
    fn rounding_never_under_charges(
        (rate_mantissa, rate_scale) in (0_u32..=12).prop_flat_map(|scale| {
            // Up to the largest rate at this scale, with small mantissas as likely as large ones.
            let most = 1_000_000_000_i128 * 10_i128.pow(scale);
            (prop_oneof![0_i128..=1_000_000, 0_i128..=most], Just(scale))
        }),
        quantity_mantissa in prop_oneof![0_i64..=1_000, 0_i64..=1_000_000_000_000],
        quantity_scale in 0_u32..=6,
    ) {
        let rate = Rate::new(Decimal::from_i128_with_scale(rate_mantissa, rate_scale)).unwrap();
        let quantity = Quantity::new(Decimal::new(quantity_mantissa, quantity_scale)).unwrap();
        let scale = 10_i128.pow(rate.as_decimal().scale() + quantity.as_decimal().scale());
        // The exact cost in micro-credits is exact_scaled / scale. When even that product does
        // not fit an i128 the cost is beyond 10^20 credits, far past the largest amount.
        let Some(exact_scaled) = rate.as_decimal().mantissa()
            .checked_mul(quantity.as_decimal().mantissa())
            .and_then(|product| product.checked_mul(1_000_000))
        else {
            prop_assert!(cost(rate, quantity).is_err(), "an astronomical cost is refused");
            return Ok(());
        };
        match cost(rate, quantity) {
            Ok(charged) => {
                let charged = i128::from(charged.micros());
                prop_assert!(charged * scale >= exact_scaled, "never under-charges");
                prop_assert!((charged - 1) * scale < exact_scaled, "never over-charges by a whole micro-credit");
            }
            Err(_) => prop_assert!(exact_scaled > i128::from(i64::MAX) * scale, "only a true overflow is refused"),
        }
    }
}

/// One random operation on an account.
#[derive(Clone, Debug)]
enum Op {
    Grant {
        amount: i64,
        priority: u32,
        lifetime: Option<i64>,
        scoped: bool,
    },
    Debit {
        feature: u8,
        cost: i64,
    },
    Authorize {
        feature: u8,
        cost: i64,
        ttl: i64,
    },
    Capture {
        hold: usize,
        share: f64,
    },
    Release {
        hold: usize,
    },
    Refund {
        debit: usize,
        share: f64,
        to_expiring_grant: bool,
    },
    Expire {
        grant: usize,
    },
    Void {
        grant: usize,
    },
    Adjust {
        amount: i64,
    },
    Advance {
        millis: i64,
    },
}

fn op_strategy() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (1_i64..=5_000_000, 0_u32..=3, prop::option::of(1_i64..=5_000), any::<bool>())
            .prop_map(|(amount, priority, lifetime, scoped)| Op::Grant { amount, priority, lifetime, scoped }),
        4 => (0_u8..2, 0_i64..=3_000_000).prop_map(|(feature, cost)| Op::Debit { feature, cost }),
        2 => (0_u8..2, 0_i64..=2_000_000, 1_i64..=3_000).prop_map(|(feature, cost, ttl)| Op::Authorize { feature, cost, ttl }),
        2 => (any::<usize>(), 0.0_f64..=1.2).prop_map(|(hold, share)| Op::Capture { hold, share }),
        1 => any::<usize>().prop_map(|hold| Op::Release { hold }),
        2 => (any::<usize>(), 0.0_f64..=1.2, any::<bool>()).prop_map(|(debit, share, to_expiring_grant)| Op::Refund { debit, share, to_expiring_grant }),
        1 => any::<usize>().prop_map(|grant| Op::Expire { grant }),
        1 => any::<usize>().prop_map(|grant| Op::Void { grant }),
        1 => (-2_000_000_i64..=2_000_000).prop_map(|amount| Op::Adjust { amount }),
        2 => (0_i64..=2_000).prop_map(|millis| Op::Advance { millis }),
    ]
}

/// Applies one operation; errors that the rules raise for impossible requests are fine, but
/// an operation that fails must leave the book exactly as it was.
fn apply(book: &mut AccountBook, op: &Op, now: &mut i64, ids: &mut Ids) {
    let before = book.clone();
    let t = at(*now);
    let result: Result<(), BookError> = match *op {
        Op::Grant {
            amount,
            priority,
            lifetime,
            scoped,
        } => {
            let id = ids.next_grant();
            let mut grant = Grant::new(id, Credits::from_micros(amount), GrantSource::Purchase, t)
                .with_priority(priority);
            grant.expires_at = lifetime.map(|l| at(*now + l));
            if scoped {
                grant.scope = Scope::Features([feature(0)].into());
            }
            book.add_grant(grant, t).map(drop)
        }
        Op::Debit { feature: f, cost } => {
            let id = ids.next_debit();
            book.debit(id, &feature(f), t, Credits::from_micros(cost))
                .map(drop)
        }
        Op::Authorize {
            feature: f,
            cost,
            ttl,
        } => {
            let id = ids.next_hold();
            book.authorize(
                id,
                &feature(f),
                t,
                Credits::from_micros(cost),
                at(*now + ttl),
            )
            .map(drop)
        }
        Op::Capture { hold, share } => match ids.pick_hold(hold) {
            Some(hold) => {
                let held = book.hold(&hold).map_or(0, |h| h.amount.micros());
                let debit = ids.next_debit();
                let amount = Credits::from_micros((held as f64 * share) as i64);
                book.capture(&hold, amount, debit, t).map(drop)
            }
            None => Ok(()),
        },
        Op::Release { hold } => match ids.pick_hold(hold) {
            Some(hold) => book.release(&hold, t).map(drop),
            None => Ok(()),
        },
        Op::Refund {
            debit,
            share,
            to_expiring_grant,
        } => match ids.pick_debit(debit) {
            Some(debit) => {
                let amount = book.debit_record(&debit).map_or(0, |r| r.amount().micros());
                let terms = RefundGrantTerms {
                    id: ids.next_grant(),
                    expires_at: to_expiring_grant.then(|| at(*now + 10_000)),
                };
                book.refund(
                    &debit,
                    Credits::from_micros((amount as f64 * share) as i64),
                    t,
                    terms,
                )
                .map(drop)
            }
            None => Ok(()),
        },
        Op::Expire { grant } => match ids.pick_grant(grant) {
            Some(grant) => book.expire(&grant, t).map(drop),
            None => Ok(()),
        },
        Op::Void { grant } => match ids.pick_grant(grant) {
            Some(grant) => book.void(&grant, t).map(drop),
            None => Ok(()),
        },
        Op::Adjust { amount } => {
            let id = ids.next_grant();
            ids.adjusted_down |= amount < 0;
            book.adjust(Credits::from_micros(amount), t, id).map(drop)
        }
        Op::Advance { millis } => {
            *now += millis;
            Ok(())
        }
    };
    if result.is_err() {
        assert_eq!(
            *book, before,
            "a refused operation {op:?} changed the book: {result:?}"
        );
    }
}

#[derive(Default)]
struct Ids {
    grants: usize,
    debits: usize,
    holds: usize,
    adjusted_down: bool,
}

impl Ids {
    fn next_grant(&mut self) -> GrantId {
        self.grants += 1;
        GrantId::new(format!("g{}", self.grants)).unwrap()
    }
    fn next_debit(&mut self) -> DebitId {
        self.debits += 1;
        DebitId::new(format!("d{}", self.debits)).unwrap()
    }
    fn next_hold(&mut self) -> HoldId {
        self.holds += 1;
        HoldId::new(format!("h{}", self.holds)).unwrap()
    }
    fn pick_grant(&self, pick: usize) -> Option<GrantId> {
        (self.grants > 0).then(|| GrantId::new(format!("g{}", pick % self.grants + 1)).unwrap())
    }
    fn pick_debit(&self, pick: usize) -> Option<DebitId> {
        (self.debits > 0).then(|| DebitId::new(format!("d{}", pick % self.debits + 1)).unwrap())
    }
    fn pick_hold(&self, pick: usize) -> Option<HoldId> {
        (self.holds > 0).then(|| HoldId::new(format!("h{}", pick % self.holds + 1)).unwrap())
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Across random grants, debits, holds, refunds, expiries, voids and adjustments, the balance
    /// equation holds after every step, every grant keeps `0 <= remaining <= amount`, and the
    /// balance never goes below the overdraft limit except through an operator's adjustment.
    #[test]
    fn the_balance_equation_holds_across_random_sequences(
        overdraft in 0_i64..=2_000_000,
        ops in prop::collection::vec(op_strategy(), 1..80),
    ) {
        let limit = Credits::from_micros(overdraft);
        let mut book = AccountBook::new(limit);
        let mut now = 1_000;
        let mut ids = Ids::default();
        for op in &ops {
            apply(&mut book, op, &mut now, &mut ids);
            if let Err(violation) = book.check() {
                return Err(TestCaseError::fail(format!("after {op:?}: {violation}")));
            }
            if !ids.adjusted_down {
                prop_assert!(book.debt() <= limit, "debt {} beyond limit {} after {:?}", book.debt(), limit, op);
            }
        }
    }

    /// A replayed debit id moves nothing.
    #[test]
    fn a_replayed_debit_moves_nothing(cost in 0_i64..=3_000_000) {
        let mut book = AccountBook::new(Credits::ZERO);
        let grant = Grant::new(GrantId::new("g").unwrap(), Credits::from_whole(5).unwrap(), GrantSource::Purchase, at(0));
        book.add_grant(grant, at(0)).unwrap();
        let id = DebitId::new("d").unwrap();
        let first = book.debit(id.clone(), &feature(0), at(1), Credits::from_micros(cost)).unwrap();
        prop_assert!(first.is_ok());
        let after_first = book.clone();
        prop_assert_eq!(book.debit(id, &feature(0), at(2), Credits::from_micros(cost)), Err(BookError::DuplicateDebit));
        prop_assert_eq!(book, after_first);
    }
}
