//! A short tour of the rules on one account: what `cargo run -p tollgate-core --example tour`
//! prints until the services exist.

use std::error::Error;

use tollgate_core::{
    AccountBook, Credits, DebitId, FeatureKey, Grant, GrantId, GrantSource, HoldId, Movement,
    PriceBook, PriceBookVersion, PriceQuery, Quantity, Rate, RefundGrantTerms, RegionId, Timestamp,
};

fn show(step: &str, movements: &[Movement], book: &AccountBook) {
    println!("{step}");
    for movement in movements {
        let grant = movement
            .grant_id
            .as_ref()
            .map_or("(debt)".to_string(), ToString::to_string);
        println!(
            "    {:<8} {:>12}  {}",
            movement.kind.as_str(),
            movement.amount.to_string(),
            grant
        );
    }
    println!("    balance {}  debt {}", book.balance(), book.debt());
}

fn main() -> Result<(), Box<dyn Error>> {
    let t = |text: &str| Timestamp::parse_rfc3339(text);
    let feature = FeatureKey::new("ai_message_gen")?;
    let region = RegionId::new("eu-west-1")?;

    let version = PriceBookVersion {
        version: 1,
        effective_from: t("2027-01-01T00:00:00Z")?,
        default: [(feature.clone(), Rate::parse("0.0015")?)].into(),
        ..PriceBookVersion::default()
    };
    let book_of_prices = PriceBook::new(vec![version]);
    let query = PriceQuery {
        account_created_at: t("2027-01-01T00:00:00Z")?,
        plan: None,
        region: &region,
        feature: &feature,
        at: t("2027-01-15T00:00:00Z")?,
        contract: None,
    };
    let price = book_of_prices.resolve(&query)?;
    let cost = price.cost(Quantity::parse("1234")?)?;
    println!(
        "1234 units of {feature} at {} credits/unit (version {}, rule {}) cost {cost}",
        price.rate,
        price.version,
        price.rule.as_str()
    );

    let mut account = AccountBook::new(Credits::parse("1")?);
    let monthly = Grant::new(
        GrantId::new("monthly")?,
        Credits::parse("2")?,
        GrantSource::Subscription,
        t("2027-01-01T00:00:00Z")?,
    )
    .with_expiry(t("2027-02-01T00:00:00Z")?);
    show(
        "grant 2 credits of subscription, expiring Feb 1",
        &account.add_grant(monthly, t("2027-01-01T00:00:00Z")?)?,
        &account,
    );
    let bought = Grant::new(
        GrantId::new("bought")?,
        Credits::parse("5")?,
        GrantSource::Purchase,
        t("2027-01-02T00:00:00Z")?,
    );
    show(
        "purchase 5 credits",
        &account.add_grant(bought, t("2027-01-02T00:00:00Z")?)?,
        &account,
    );

    let debit = account.debit(
        DebitId::new("d1")?,
        &feature,
        t("2027-01-15T00:00:00Z")?,
        cost,
    )?;
    show(
        &format!("debit {cost}: the subscription burns first"),
        &debit.map_err(|s| format!("refused: {s:?}"))?,
        &account,
    );

    let hold = HoldId::new("h1")?;
    let held = account
        .authorize(
            hold.clone(),
            &feature,
            t("2027-01-15T00:01:00Z")?,
            Credits::parse("3")?,
            t("2027-01-15T00:16:00Z")?,
        )?
        .map_err(|s| format!("refused: {s:?}"))?;
    println!(
        "authorize 3 credits for 15 minutes: {} set aside, balance unchanged",
        held.amount
    );
    let captured = account.capture(
        &hold,
        Credits::parse("2.25")?,
        DebitId::new("c1")?,
        t("2027-01-15T00:02:00Z")?,
    )?;
    show(
        "capture 2.25 of the 3 held; the rest goes back",
        &captured?,
        &account,
    );

    let refused = account.debit(
        DebitId::new("d2")?,
        &feature,
        t("2027-01-16T00:00:00Z")?,
        Credits::parse("10")?,
    )?;
    if let Err(shortfall) = refused {
        println!(
            "debit 10 refused: {} available (grants + overdraft room), short by {}",
            shortfall.available, shortfall.shortfall
        );
    }

    let terms = RefundGrantTerms {
        id: GrantId::new("refund-d1")?,
        expires_at: None,
    };
    show(
        "refund 1 credit of d1",
        &account.refund(
            &DebitId::new("d1")?,
            Credits::parse("1")?,
            t("2027-01-20T00:00:00Z")?,
            terms,
        )?,
        &account,
    );
    show(
        "Feb 1: the subscription's remainder expires",
        &account.expire(&GrantId::new("monthly")?, t("2027-02-01T00:00:00Z")?)?,
        &account,
    );

    let totals = account.totals();
    println!(
        "ledger: granted {} - debited {} + refunded {} - expired {} - voided {} + adjusted {} = {}",
        totals.granted,
        totals.debited,
        totals.refunded,
        totals.expired,
        totals.voided,
        totals.adjusted,
        totals.expected_balance()?
    );
    account.check()?;
    println!("balance equation and grant invariants: ok");
    Ok(())
}
