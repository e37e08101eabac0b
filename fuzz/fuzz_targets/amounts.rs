//! Any UTF-8 text into the decimal parsers: `Credits::parse` and its signed variants, the
//! decoders built on them (`decode::non_negative_credits`, `positive_credits`,
//! `nonzero_credits`), `Quantity::parse`, `Rate::parse`, and a cost basis' `decode::money`.
//! A text `RATE*QUANTITY` is also priced with `cost`.
//!
//! Each parser is judged against the integer reference reader in `src/oracle.rs`: it accepts
//! exactly the texts of the grammar that carry at most its decimals and lie within its bounds,
//! to the exact value; what it accepts formats to a canonical text that parses back to the same
//! value; a cost is the exact product rounded up to the micro-credit, or `Overflow` when that
//! is beyond `Credits::MAX`.

#![no_main]

use libfuzzer_sys::fuzz_target;
use rust_decimal::Decimal;
use tollgate_core::credits::{CREDITS_SCALE_MAX, DECIMAL_TEXT_LEN_MAX};
use tollgate_core::rate::{
    QUANTITY_SCALE_MAX, QUANTITY_UNITS_MAX, RATE_CREDITS_MAX, RATE_SCALE_MAX,
};
use tollgate_core::{cost, AmountError, Credits, Quantity, Rate};
use tollgate_fuzz::contract::assert_refusal_text;
use tollgate_fuzz::oracle::{self, Refusal};
use tollgate_proto::{decode, pb, ErrorCode};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    credits(text);
    decoders(text);
    let quantity = quantity(text);
    let rate = rate(text);
    if let (Some(rate), Some(quantity)) = (rate, quantity) {
        priced(rate, quantity);
    }
    if let Some((rate_text, quantity_text)) = text.split_once('*') {
        if let (Some(rate), Some(quantity)) = (self::rate(rate_text), self::quantity(quantity_text))
        {
            priced(rate, quantity);
        }
    }
    money(text);
});

/// A canonical decimal text: what `Display` of an accepted amount must look like.
fn assert_canonical(shown: &str, what: &str) {
    assert!(oracle::is_grammatical(shown), "{what} shows as {shown:?}");
    assert!(
        shown.len() <= DECIMAL_TEXT_LEN_MAX,
        "{what} shows as {shown:?}"
    );
    assert_ne!(shown, "-0", "{what}");
    let unsigned = shown.strip_prefix('-').unwrap_or(shown);
    assert!(
        unsigned == "0" || unsigned.starts_with("0.") || !unsigned.starts_with('0'),
        "{what} shows a leading zero: {shown:?}"
    );
    if let Some((_, fraction)) = unsigned.split_once('.') {
        assert!(
            !fraction.ends_with('0'),
            "{what} shows a trailing zero: {shown:?}"
        );
    }
}

/// The reference value of `text` in `10^-scale` units, if within `min..=max` of them.
fn expected(text: &str, scale: u32, min: i128, max: i128) -> Result<i128, Refusal> {
    let units = oracle::units(text, scale)?;
    if (min..=max).contains(&units) {
        Ok(units)
    } else {
        Err(Refusal::Overflow)
    }
}

fn credits(text: &str) -> Option<Credits> {
    let parsed = Credits::parse(text);
    let reference = expected(
        text,
        CREDITS_SCALE_MAX,
        i128::from(i64::MIN),
        i128::from(i64::MAX),
    );
    match (&parsed, reference) {
        (Ok(amount), Ok(micros)) => assert_eq!(i128::from(amount.micros()), micros, "{text:?}"),
        (Err(error), Err(refusal)) => assert_eq!(
            *error == AmountError::Malformed,
            refusal == Refusal::Malformed,
            "{text:?}: Credits::parse says {error:?}, the grammar says {refusal:?}"
        ),
        _ => panic!("{text:?}: Credits::parse says {parsed:?}, the reference {reference:?}"),
    }
    let amount = parsed.ok()?;
    let shown = amount.to_string();
    assert_canonical(&shown, text);
    assert_eq!(
        Credits::parse(&shown),
        Ok(amount),
        "{text:?} shows as {shown:?}"
    );
    // The signed variants are the same reading with one more condition.
    let non_negative = Credits::parse_non_negative(text);
    let positive = Credits::parse_positive(text);
    if amount.is_negative() {
        assert_eq!(non_negative, Err(AmountError::Negative), "{text:?}");
        assert_eq!(positive, Err(AmountError::Negative), "{text:?}");
    } else if amount.is_zero() {
        assert_eq!(non_negative, Ok(amount), "{text:?}");
        assert_eq!(positive, Err(AmountError::Zero), "{text:?}");
    } else {
        assert_eq!(non_negative, Ok(amount), "{text:?}");
        assert_eq!(positive, Ok(amount), "{text:?}");
    }
    Some(amount)
}

/// The wire decoders: the same readings, refusals as `INVALID_ARGUMENT` naming the field.
fn decoders(text: &str) {
    let parsed = Credits::parse(text);
    let refused = |result: Result<Credits, tollgate_proto::ServiceError>| {
        if let Err(error) = result {
            assert_eq!(error.code, ErrorCode::InvalidArgument, "{text:?}");
            assert_refusal_text("IssueGrantRequest", &error.message);
            assert!(error.message.starts_with("amount: "), "{error:?}");
        }
    };
    let non_negative = decode::non_negative_credits("amount", text);
    if text.is_empty() {
        assert_eq!(non_negative, Ok(Credits::ZERO));
    } else {
        assert_eq!(
            non_negative.clone().ok(),
            parsed.ok().filter(|a| !a.is_negative()),
            "{text:?}"
        );
    }
    refused(non_negative);
    let positive = decode::positive_credits("amount", text);
    assert_eq!(
        positive.clone().ok(),
        parsed.ok().filter(|a| a.is_positive()),
        "{text:?}"
    );
    refused(positive);
    let nonzero = decode::nonzero_credits("amount", text);
    assert_eq!(
        nonzero.clone().ok(),
        parsed.ok().filter(|a| !a.is_zero()),
        "{text:?}"
    );
    refused(nonzero);
}

fn quantity(text: &str) -> Option<Quantity> {
    let parsed = Quantity::parse(text);
    let max = i128::from(QUANTITY_UNITS_MAX) * 10_i128.pow(QUANTITY_SCALE_MAX);
    let reference = expected(text, QUANTITY_SCALE_MAX, 0, max);
    bounded_reading(
        "Quantity",
        text,
        parsed.map(Quantity::as_decimal),
        reference,
        QUANTITY_SCALE_MAX,
    );
    let quantity = parsed.ok()?;
    let shown = quantity.to_string();
    assert_canonical(&shown, text);
    assert_eq!(
        Quantity::parse(&shown),
        Ok(quantity),
        "{text:?} shows as {shown:?}"
    );
    Some(quantity)
}

fn rate(text: &str) -> Option<Rate> {
    let parsed = Rate::parse(text);
    let max = i128::from(RATE_CREDITS_MAX) * 10_i128.pow(RATE_SCALE_MAX);
    let reference = expected(text, RATE_SCALE_MAX, 0, max);
    bounded_reading(
        "Rate",
        text,
        parsed.map(Rate::as_decimal),
        reference,
        RATE_SCALE_MAX,
    );
    let rate = parsed.ok()?;
    let shown = rate.to_string();
    assert_canonical(&shown, text);
    assert_eq!(Rate::parse(&shown), Ok(rate), "{text:?} shows as {shown:?}");
    Some(rate)
}

/// A zero-or-more reading (`Rate`, `Quantity`) against the reference: the same texts accepted,
/// to the same value; a negative zero reads as zero.
fn bounded_reading(
    what: &str,
    text: &str,
    parsed: Result<Decimal, AmountError>,
    reference: Result<i128, Refusal>,
    scale: u32,
) {
    // The reference reads `-0` as 0, which both parsers accept; any other negative is refused.
    match (&parsed, reference) {
        (Ok(value), Ok(units)) => {
            assert_eq!(
                *value,
                Decimal::from_i128_with_scale(units, scale),
                "{what} {text:?}"
            );
            assert!(
                !value.is_sign_negative(),
                "{what} {text:?} keeps a minus sign"
            );
            assert!(value.scale() <= scale, "{what} {text:?}");
        }
        (Err(error), Err(refusal)) => assert_eq!(
            *error == AmountError::Malformed,
            refusal == Refusal::Malformed,
            "{what} {text:?}: parse says {error:?}, the grammar says {refusal:?}"
        ),
        _ => panic!("{what} {text:?}: parse says {parsed:?}, the reference {reference:?}"),
    }
}

/// `cost` is `rate × quantity` rounded up to the next micro-credit, never less, never a wrap.
fn priced(rate: Rate, quantity: Quantity) {
    let units = |value: Decimal, scale: u32| {
        // Both readings keep at most `scale` decimals, so this is exact.
        value.mantissa() * 10_i128.pow(scale - value.scale())
    };
    let rate_units = units(rate.as_decimal(), RATE_SCALE_MAX);
    let quantity_units = units(quantity.as_decimal(), QUANTITY_SCALE_MAX);
    // The product is in 10^-18 credits; a micro-credit is 10^12 of them.
    let divisor = 10_i128.pow(RATE_SCALE_MAX + QUANTITY_SCALE_MAX - CREDITS_SCALE_MAX);
    let exact = rate_units
        .checked_mul(quantity_units)
        .map(|product| (product + divisor - 1) / divisor)
        .filter(|micros| *micros <= i128::from(i64::MAX));
    let priced = cost(rate, quantity);
    match (priced, exact) {
        (Ok(amount), Some(micros)) => {
            assert_eq!(i128::from(amount.micros()), micros, "{rate} × {quantity}")
        }
        (Err(AmountError::Overflow), None) => {}
        (priced, exact) => panic!("{rate} × {quantity}: cost says {priced:?}, exact {exact:?}"),
    }
}

/// A cost basis: a decimal of zero or more (rust_decimal's own reading, at most
/// `MONEY_TEXT_LEN_MAX` bytes) and a currency; what is accepted encodes as `grant_to_pb` does
/// and decodes again to the same money.
fn money(text: &str) {
    let wire = pb::Money {
        amount: text.to_owned(),
        currency: "EUR".to_owned(),
    };
    match decode::money("cost_basis", Some(&wire)) {
        Ok(Some(money)) => {
            assert!(!money.amount.is_sign_negative(), "{text:?}");
            let again = pb::Money {
                amount: money.amount.to_string(),
                currency: money.currency.as_str().to_owned(),
            };
            assert_eq!(
                decode::money("cost_basis", Some(&again)),
                Ok(Some(money)),
                "{text:?} encodes as {:?}",
                again.amount
            );
        }
        Ok(None) => panic!("{text:?}: a cost basis that was sent decoded to none"),
        Err(error) => {
            assert_eq!(error.code, ErrorCode::InvalidArgument, "{text:?}");
            assert_refusal_text("IssueGrantRequest", &error.message);
        }
    }
}
