//! Exact amounts of credits: `i64` micro-credits inside, decimal strings outside.

use std::fmt;
use std::str::FromStr;

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use crate::error::AmountError;

/// Micro-credits in one credit: amounts carry exactly six decimals.
pub const MICROS_PER_CREDIT: i64 = 1_000_000;
/// Decimals an amount of credits may carry.
pub const CREDITS_SCALE_MAX: u32 = 6;
/// Longest decimal string accepted for any amount, rate or quantity; bounds parsing work.
pub const DECIMAL_TEXT_LEN_MAX: usize = 40;

/// An exact amount of credits, possibly negative (a balance in overdraft).
///
/// Arithmetic is checked: an overflow is an [`AmountError::Overflow`], never a wrap.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(try_from = "String", into = "String")]
pub struct Credits(i64);

impl Credits {
    pub const ZERO: Credits = Credits(0);
    pub const MAX: Credits = Credits(i64::MAX);
    /// One micro-credit, the smallest amount there is.
    pub const MICRO: Credits = Credits(1);

    pub const fn from_micros(micros: i64) -> Self {
        Credits(micros)
    }

    pub const fn micros(self) -> i64 {
        self.0
    }

    /// Whole credits, e.g. `Credits::from_whole(5)` is `"5"`.
    pub fn from_whole(credits: i64) -> Result<Self, AmountError> {
        credits
            .checked_mul(MICROS_PER_CREDIT)
            .map(Credits)
            .ok_or(AmountError::Overflow)
    }

    pub fn checked_add(self, other: Credits) -> Result<Credits, AmountError> {
        self.0
            .checked_add(other.0)
            .map(Credits)
            .ok_or(AmountError::Overflow)
    }

    pub fn checked_sub(self, other: Credits) -> Result<Credits, AmountError> {
        self.0
            .checked_sub(other.0)
            .map(Credits)
            .ok_or(AmountError::Overflow)
    }

    pub fn checked_neg(self) -> Result<Credits, AmountError> {
        self.0
            .checked_neg()
            .map(Credits)
            .ok_or(AmountError::Overflow)
    }

    /// `self - other`, or zero when `other` is larger. Used for "what is left" questions.
    pub fn saturating_sub_floor_zero(self, other: Credits) -> Credits {
        Credits(self.0.saturating_sub(other.0).max(0))
    }

    pub fn checked_sum<I: IntoIterator<Item = Credits>>(items: I) -> Result<Credits, AmountError> {
        items
            .into_iter()
            .try_fold(Credits::ZERO, Credits::checked_add)
    }

    pub const fn is_zero(self) -> bool {
        self.0 == 0
    }

    pub const fn is_positive(self) -> bool {
        self.0 > 0
    }

    pub const fn is_negative(self) -> bool {
        self.0 < 0
    }

    /// The amount as a decimal with no trailing zeros (`12.5`, `0`, `-3.000001`).
    pub fn to_decimal(self) -> Decimal {
        Decimal::new(self.0, CREDITS_SCALE_MAX).normalize()
    }

    /// An exact conversion: more than six decimals is refused, never rounded.
    pub fn from_decimal(value: Decimal) -> Result<Self, AmountError> {
        let value = value.normalize();
        let scale = value.scale();
        if scale > CREDITS_SCALE_MAX {
            return Err(AmountError::TooPrecise {
                scale,
                scale_max: CREDITS_SCALE_MAX,
            });
        }
        let factor = pow10(CREDITS_SCALE_MAX - scale);
        let micros = value
            .mantissa()
            .checked_mul(factor)
            .ok_or(AmountError::Overflow)?;
        i64::try_from(micros)
            .map(Credits)
            .map_err(|_| AmountError::Overflow)
    }

    /// Parses a plain decimal string (`"12.5"`, `"-0.000001"`), at most six decimals.
    pub fn parse(text: &str) -> Result<Self, AmountError> {
        Credits::from_decimal(parse_decimal_text(text)?)
    }

    /// Parses an amount that must be zero or more.
    pub fn parse_non_negative(text: &str) -> Result<Self, AmountError> {
        let amount = Credits::parse(text)?;
        if amount.is_negative() {
            return Err(AmountError::Negative);
        }
        Ok(amount)
    }

    /// Parses an amount that must be more than zero.
    pub fn parse_positive(text: &str) -> Result<Self, AmountError> {
        let amount = Credits::parse_non_negative(text)?;
        if amount.is_zero() {
            return Err(AmountError::Zero);
        }
        Ok(amount)
    }
}

impl fmt::Display for Credits {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.to_decimal(), f)
    }
}

impl FromStr for Credits {
    type Err = AmountError;
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Credits::parse(text)
    }
}

impl TryFrom<String> for Credits {
    type Error = AmountError;
    fn try_from(text: String) -> Result<Self, Self::Error> {
        Credits::parse(&text)
    }
}

impl From<Credits> for String {
    fn from(amount: Credits) -> String {
        amount.to_string()
    }
}

/// Ten to the power `exponent`, for the small exponents decimals use (at most 28).
pub(crate) fn pow10(exponent: u32) -> i128 {
    debug_assert!(exponent <= 38, "10^{exponent} does not fit an i128");
    10_i128.pow(exponent)
}

/// Parses the strict decimal grammar shared by amounts, rates and quantities:
/// an optional `-`, digits, and optionally `.` followed by digits. No exponent, no
/// separators, no surrounding spaces: what a human reads is what is charged.
pub(crate) fn parse_decimal_text(text: &str) -> Result<Decimal, AmountError> {
    if text.is_empty() || text.len() > DECIMAL_TEXT_LEN_MAX {
        return Err(AmountError::Malformed);
    }
    let unsigned = text.strip_prefix('-').unwrap_or(text);
    let (whole, fraction) = match unsigned.split_once('.') {
        Some((whole, fraction)) => (whole, Some(fraction)),
        None => (unsigned, None),
    };
    let digits_only = |part: &str| !part.is_empty() && part.bytes().all(|b| b.is_ascii_digit());
    if !digits_only(whole) || fraction.is_some_and(|fraction| !digits_only(fraction)) {
        return Err(AmountError::Malformed);
    }
    // Trailing zeros of the fraction do not change the value, but `from_str_exact` refuses more
    // than 28 written decimals even when the extra ones are zeros; drop them first.
    let significant = match fraction {
        Some(_) => text.trim_end_matches('0').trim_end_matches('.'),
        None => text,
    };
    // `from_str_exact` refuses what it would have to round, so no digit is ever dropped.
    Decimal::from_str_exact(significant).map_err(|_| AmountError::Overflow)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_formats_round_trip() {
        for (text, micros) in [
            ("0", 0),
            ("12.5", 12_500_000),
            ("-0.000001", -1),
            ("1000000", 1_000_000_000_000),
            ("0.1", 100_000),
        ] {
            let amount = Credits::parse(text).unwrap();
            assert_eq!(amount.micros(), micros, "{text}");
            assert_eq!(amount.to_string(), text);
        }
    }

    #[test]
    fn trailing_zeros_are_accepted_and_dropped() {
        assert_eq!(Credits::parse("12.500000").unwrap().to_string(), "12.5");
        assert_eq!(Credits::parse("-0.0").unwrap().to_string(), "0");
    }

    #[test]
    fn seven_decimals_are_refused_even_when_zero_padded_is_fine() {
        assert_eq!(
            Credits::parse("0.0000001"),
            Err(AmountError::TooPrecise {
                scale: 7,
                scale_max: 6
            })
        );
        // Seven written decimals whose last is zero are six real ones.
        assert_eq!(Credits::parse("0.1234560").unwrap().micros(), 123_456);
    }

    /// Found by `fuzz/` (target `amounts`): 29 or more written decimals were refused as out of
    /// range even when every one past the sixth was a zero.
    #[test]
    fn any_number_of_trailing_zeros_is_accepted() {
        let zeros = "0".repeat(30);
        assert_eq!(Credits::parse(&format!("0.{zeros}")), Ok(Credits::ZERO));
        assert_eq!(
            Credits::parse(&format!("-1.5{zeros}")).unwrap().to_string(),
            "-1.5"
        );
        assert_eq!(
            crate::Quantity::parse("1000000000000.000000000000000000")
                .unwrap()
                .to_string(),
            "1000000000000"
        );
        assert_eq!(
            crate::Rate::parse(&format!("0.000000000001{}", "0".repeat(20)))
                .unwrap()
                .to_string(),
            "0.000000000001"
        );
        // A nonzero digit past the 28th is still refused, never rounded.
        assert!(Credits::parse(&format!("1.{zeros}1")).is_err());
    }

    #[test]
    fn malformed_text_is_refused() {
        for text in [
            "", " 1", "1 ", "+1", "1e3", "1_000", ".5", "5.", "--1", "1.2.3", "abc", "٣",
        ] {
            assert_eq!(
                Credits::parse(text),
                Err(AmountError::Malformed),
                "{text:?}"
            );
        }
        let long = "1".repeat(DECIMAL_TEXT_LEN_MAX + 1);
        assert_eq!(Credits::parse(&long), Err(AmountError::Malformed));
    }

    #[test]
    fn out_of_range_is_an_overflow_not_a_wrap() {
        assert_eq!(
            Credits::parse("9223372036854.775807").unwrap(),
            Credits::MAX
        );
        assert_eq!(
            Credits::parse("9223372036854.775808"),
            Err(AmountError::Overflow)
        );
        assert_eq!(
            Credits::parse("99999999999999999999999999999999"),
            Err(AmountError::Overflow)
        );
        assert_eq!(
            Credits::MAX.checked_add(Credits::MICRO),
            Err(AmountError::Overflow)
        );
        assert_eq!(
            Credits::from_micros(i64::MIN).checked_neg(),
            Err(AmountError::Overflow)
        );
        assert_eq!(
            Credits::from_whole(i64::MAX / 2),
            Err(AmountError::Overflow)
        );
    }

    #[test]
    fn sign_constraints() {
        assert_eq!(
            Credits::parse_non_negative("-1"),
            Err(AmountError::Negative)
        );
        assert_eq!(Credits::parse_positive("0"), Err(AmountError::Zero));
        assert_eq!(Credits::parse_positive("0.000001").unwrap(), Credits::MICRO);
    }
}
