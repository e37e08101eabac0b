//! Worked examples of the rules on one account, as support and finance would tell them.

use tollgate_core::{
    AccountBook, BookError, Credits, DebitId, EntryKind, FeatureKey, Grant, GrantId, GrantSchedule,
    GrantSource, HoldError, HoldId, Movement, PeriodUnit, Recurrence, RefundGrantTerms,
    RolloverPolicy, Scope, Timestamp,
};

fn at(millis: i64) -> Timestamp {
    Timestamp::from_millis(millis).unwrap()
}

fn credits(text: &str) -> Credits {
    Credits::parse(text).unwrap()
}

fn grant_id(id: &str) -> GrantId {
    GrantId::new(id).unwrap()
}

fn debit_id(id: &str) -> DebitId {
    DebitId::new(id).unwrap()
}

fn gen() -> FeatureKey {
    FeatureKey::new("ai_message_gen").unwrap()
}

fn purchase(id: &str, amount: &str) -> Grant {
    Grant::new(grant_id(id), credits(amount), GrantSource::Purchase, at(0))
}

fn lines(movements: &[Movement]) -> Vec<(EntryKind, String, Option<String>)> {
    movements
        .iter()
        .map(|m| {
            (
                m.kind,
                m.amount.to_string(),
                m.grant_id.as_ref().map(ToString::to_string),
            )
        })
        .collect()
}

#[test]
fn a_debit_spans_three_grants_in_burn_down_order() {
    let mut book = AccountBook::new(Credits::ZERO);
    book.add_grant(purchase("purchase", "10"), at(0)).unwrap();
    book.add_grant(
        Grant::new(
            grant_id("monthly"),
            credits("3"),
            GrantSource::Subscription,
            at(0),
        )
        .with_expiry(at(10_000)),
        at(0),
    )
    .unwrap();
    book.add_grant(
        Grant::new(grant_id("trial"), credits("2"), GrantSource::Trial, at(0))
            .with_expiry(at(5_000)),
        at(0),
    )
    .unwrap();
    let movements = book
        .debit(debit_id("d1"), &gen(), at(100), credits("7.5"))
        .unwrap()
        .unwrap();
    // Subscription (priority 10) before trial (20) before purchase (50).
    assert_eq!(
        lines(&movements),
        [
            (EntryKind::Debit, "3".into(), Some("monthly".into())),
            (EntryKind::Debit, "2".into(), Some("trial".into())),
            (EntryKind::Debit, "2.5".into(), Some("purchase".into())),
        ]
    );
    assert_eq!(book.balance(), credits("7.5"));
    book.check().unwrap();
}

#[test]
fn overdraft_down_to_the_limit_then_settled_by_the_next_grant() {
    let mut book = AccountBook::new(credits("5"));
    book.add_grant(purchase("g1", "1"), at(0)).unwrap();
    book.debit(debit_id("d1"), &gen(), at(1), credits("6"))
        .unwrap()
        .unwrap();
    assert_eq!(book.balance(), credits("-5"));
    let refused = book
        .debit(debit_id("d2"), &gen(), at(2), Credits::MICRO)
        .unwrap()
        .unwrap_err();
    assert_eq!(
        refused.shortfall,
        Credits::MICRO,
        "one micro-credit past the limit is refused"
    );

    let movements = book.add_grant(purchase("g2", "8"), at(3)).unwrap();
    assert_eq!(
        lines(&movements),
        [
            (EntryKind::Grant, "8".into(), Some("g2".into())),
            (EntryKind::Settle, "5".into(), Some("g2".into()))
        ]
    );
    assert_eq!(book.debt(), Credits::ZERO);
    assert_eq!(book.grant(&grant_id("g2")).unwrap().remaining, credits("3"));
    book.check().unwrap();
}

#[test]
fn a_refund_to_an_expired_grant_lands_in_a_new_refund_grant() {
    let mut book = AccountBook::new(Credits::ZERO);
    let promo = Grant::new(grant_id("promo"), credits("4"), GrantSource::Promo, at(0))
        .with_expiry(at(1_000));
    book.add_grant(promo, at(0)).unwrap();
    book.add_grant(purchase("bought", "10"), at(0)).unwrap();
    book.debit(debit_id("d1"), &gen(), at(500), credits("6"))
        .unwrap()
        .unwrap();
    book.expire(&grant_id("promo"), at(1_000)).unwrap();

    let terms = RefundGrantTerms {
        id: grant_id("refund-1"),
        expires_at: Some(at(90_000)),
    };
    let movements = book
        .refund(&debit_id("d1"), credits("5"), at(2_000), terms)
        .unwrap();
    // Last draw first: 2 back to the still-active purchase, 3 for the expired promo go to a new grant.
    assert_eq!(
        lines(&movements),
        [
            (EntryKind::Refund, "2".into(), Some("bought".into())),
            (EntryKind::Refund, "3".into(), Some("refund-1".into()))
        ]
    );
    let refund_grant = book.grant(&grant_id("refund-1")).unwrap();
    assert_eq!(refund_grant.source, GrantSource::Refund);
    assert_eq!(
        refund_grant.priority,
        GrantSource::Promo.default_priority(),
        "keeps its debit's grant's priority"
    );
    assert_eq!(refund_grant.expires_at, Some(at(90_000)));

    let terms = RefundGrantTerms {
        id: grant_id("refund-2"),
        expires_at: None,
    };
    assert_eq!(
        book.refund(&debit_id("d1"), credits("1.000001"), at(2_000), terms),
        Err(BookError::RefundExceedsDebit {
            requested: credits("1.000001"),
            refundable: credits("1")
        })
    );
    book.check().unwrap();
}

#[test]
fn holds_set_credits_aside_until_captured_released_or_expired() {
    let mut book = AccountBook::new(Credits::ZERO);
    book.add_grant(purchase("g", "10"), at(0)).unwrap();
    let hold = book
        .authorize(
            HoldId::new("h1").unwrap(),
            &gen(),
            at(10),
            credits("8"),
            at(1_010),
        )
        .unwrap()
        .unwrap();
    assert_eq!(hold.amount, credits("8"));
    // Only 2 are free while the hold stands.
    assert!(book
        .debit(debit_id("d1"), &gen(), at(20), credits("2.000001"))
        .unwrap()
        .is_err());
    // The hold expires with no further call: the next operation after its TTL sees 10 again.
    book.debit(debit_id("d2"), &gen(), at(1_010), credits("10"))
        .unwrap()
        .unwrap();
    assert_eq!(book.balance(), Credits::ZERO);

    let mut book = AccountBook::new(Credits::ZERO);
    book.add_grant(purchase("g", "10"), at(0)).unwrap();
    book.authorize(
        HoldId::new("h1").unwrap(),
        &gen(),
        at(10),
        credits("8"),
        at(1_010),
    )
    .unwrap()
    .unwrap();
    book.release(&HoldId::new("h1").unwrap(), at(20))
        .unwrap()
        .unwrap();
    let refused = book
        .capture(
            &HoldId::new("h1").unwrap(),
            credits("1"),
            debit_id("c1"),
            at(30),
        )
        .unwrap();
    assert_eq!(refused, Err(HoldError::AlreadyReleased));
    assert_eq!(book.balance(), credits("10"));
    book.check().unwrap();
}

#[test]
fn a_hold_on_a_grant_that_expires_meanwhile_can_still_be_captured() {
    let mut book = AccountBook::new(Credits::ZERO);
    let monthly = Grant::new(
        grant_id("m"),
        credits("10"),
        GrantSource::Subscription,
        at(0),
    )
    .with_expiry(at(100));
    book.add_grant(monthly, at(0)).unwrap();
    book.authorize(
        HoldId::new("h").unwrap(),
        &gen(),
        at(50),
        credits("6"),
        at(5_000),
    )
    .unwrap()
    .unwrap();
    let expired = book.expire(&grant_id("m"), at(100)).unwrap();
    assert_eq!(
        lines(&expired),
        [(EntryKind::Expire, "4".into(), Some("m".into()))]
    );
    let captured = book
        .capture(
            &HoldId::new("h").unwrap(),
            credits("5"),
            debit_id("c"),
            at(200),
        )
        .unwrap()
        .unwrap();
    assert_eq!(
        lines(&captured),
        [
            (EntryKind::Debit, "5".into(), Some("m".into())),
            (EntryKind::Expire, "1".into(), Some("m".into()))
        ]
    );
    assert_eq!(book.grant(&grant_id("m")).unwrap().remaining, Credits::ZERO);
    book.check().unwrap();
}

#[test]
fn a_period_end_carries_what_the_policy_allows_and_expires_the_rest() {
    let schedule = GrantSchedule {
        id: "acme.pro".into(),
        recurrence: Recurrence::new(at(0), PeriodUnit::Day, 1).unwrap(),
        amount: credits("100"),
        priority: 10,
        scope: Scope::All,
        source: GrantSource::Subscription,
        rollover: RolloverPolicy::Max { cap: credits("30") },
    };
    let mut book = AccountBook::new(Credits::ZERO);
    book.add_grant(schedule.grant_for_period(0).unwrap(), at(0))
        .unwrap();
    book.debit(debit_id("d1"), &gen(), at(1_000), credits("55"))
        .unwrap()
        .unwrap();
    let day = 86_400_000;
    assert!(matches!(
        book.end_period(&schedule, 0, at(day - 1)),
        Err(BookError::NotYetExpired { .. })
    ));
    let movements = book.end_period(&schedule, 0, at(day)).unwrap().unwrap();
    assert_eq!(
        lines(&movements),
        [
            (EntryKind::Rollover, "30".into(), Some("acme.pro.p0".into())),
            (
                EntryKind::Rollover,
                "30".into(),
                Some("acme.pro.p0.rollover".into())
            ),
            (EntryKind::Expire, "15".into(), Some("acme.pro.p0".into())),
            (EntryKind::Grant, "100".into(), Some("acme.pro.p1".into())),
        ]
    );
    assert_eq!(book.balance(), credits("130"));
    // The carried credits burn first (rollover priority 5).
    let next = book
        .debit(debit_id("d2"), &gen(), at(day + 1), credits("31"))
        .unwrap()
        .unwrap();
    assert_eq!(
        lines(&next),
        [
            (
                EntryKind::Debit,
                "30".into(),
                Some("acme.pro.p0.rollover".into())
            ),
            (EntryKind::Debit, "1".into(), Some("acme.pro.p1".into())),
        ]
    );
    book.check().unwrap();
}

#[test]
fn adjustments_in_both_directions() {
    let mut book = AccountBook::new(Credits::ZERO);
    book.add_grant(purchase("g", "3"), at(0)).unwrap();
    let down = book
        .adjust(credits("-5"), at(1), grant_id("unused"))
        .unwrap();
    assert_eq!(
        lines(&down),
        [
            (EntryKind::Adjust, "-3".into(), Some("g".into())),
            (EntryKind::Adjust, "-2".into(), None)
        ]
    );
    assert_eq!(book.balance(), credits("-2"));
    let up = book
        .adjust(credits("4"), at(2), grant_id("goodwill"))
        .unwrap();
    assert_eq!(
        lines(&up),
        [
            (EntryKind::Adjust, "4".into(), Some("goodwill".into())),
            (EntryKind::Settle, "2".into(), Some("goodwill".into()))
        ]
    );
    assert_eq!(book.balance(), credits("2"));
    assert_eq!(book.totals().adjusted, credits("-1"));
    book.check().unwrap();
}

#[test]
fn a_negative_adjustment_leaves_what_regions_still_hold_and_takes_from_the_next_grants() {
    let mut book = AccountBook::new(Credits::ZERO);
    book.add_grant(purchase("a", "10"), at(0)).unwrap();
    book.add_grant(purchase("b", "10"), at(0)).unwrap();
    // 6 of grant a are out in a region (a pending hold there): the adjustment leaves them.
    let out = [(grant_id("a"), credits("6"))].into_iter().collect();
    let down = book
        .adjust_leaving(credits("-7"), at(1), grant_id("unused"), &out)
        .unwrap();
    assert_eq!(
        lines(&down),
        [
            (EntryKind::Adjust, "-4".into(), Some("a".into())),
            (EntryKind::Adjust, "-3".into(), Some("b".into()))
        ]
    );
    assert_eq!(book.balance(), credits("13"));
    book.check().unwrap();
}

#[test]
fn grants_from_derived_sources_need_their_own_operation() {
    let mut book = AccountBook::new(Credits::ZERO);
    let refund = Grant::new(grant_id("r"), credits("1"), GrantSource::Refund, at(0));
    assert_eq!(
        book.add_grant(refund, at(0)),
        Err(BookError::SourceNotAllowed(GrantSource::Refund))
    );
    assert_eq!(book, AccountBook::new(Credits::ZERO));
}
