//! Prices (credits per unit), quantities, and the cost of a request.
//!
//! A rate may be finer than a micro-credit (a token can cost `0.0000015` credits), so a cost is
//! computed exactly in integers and only then rounded **up** to the next micro-credit: rounding
//! never under-charges.

use std::fmt;

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use crate::credits::{parse_decimal_text, pow10, Credits, CREDITS_SCALE_MAX};
use crate::error::AmountError;

/// Decimals a rate may carry.
pub const RATE_SCALE_MAX: u32 = 12;
/// Largest rate, in credits per unit.
pub const RATE_CREDITS_MAX: i64 = 1_000_000_000;
/// Decimals a quantity may carry (fractional units such as GB-hours).
pub const QUANTITY_SCALE_MAX: u32 = 6;
/// Largest quantity of units in one request.
pub const QUANTITY_UNITS_MAX: i64 = 1_000_000_000_000;

/// Credits per unit of a feature: zero or more, at most [`RATE_SCALE_MAX`] decimals.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Rate(Decimal);

/// How many units a request consumes: zero or more, at most [`QUANTITY_SCALE_MAX`] decimals.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Quantity(Decimal);

fn bounded(value: Decimal, scale_max: u32, whole_max: i64) -> Result<Decimal, AmountError> {
    let value = value.normalize();
    if value.is_sign_negative() && !value.is_zero() {
        return Err(AmountError::Negative);
    }
    if value.scale() > scale_max {
        return Err(AmountError::TooPrecise {
            scale: value.scale(),
            scale_max,
        });
    }
    if value > Decimal::from(whole_max) {
        return Err(AmountError::Overflow);
    }
    // A zero read as "-0" keeps its sign bit in `Decimal`; drop it so equal values compare equal.
    Ok(if value.is_zero() {
        Decimal::ZERO
    } else {
        value
    })
}

impl Rate {
    pub const ZERO: Rate = Rate(Decimal::ZERO);

    pub fn new(value: Decimal) -> Result<Self, AmountError> {
        bounded(value, RATE_SCALE_MAX, RATE_CREDITS_MAX).map(Rate)
    }

    pub fn parse(text: &str) -> Result<Self, AmountError> {
        Rate::new(parse_decimal_text(text)?)
    }

    pub fn from_credits(credits: Credits) -> Result<Self, AmountError> {
        Rate::new(credits.to_decimal())
    }

    pub fn as_decimal(self) -> Decimal {
        self.0
    }

    /// The rate times a multiplier (a contract's discount), rounded **up** to
    /// [`RATE_SCALE_MAX`] decimals so that a discount never under-charges by rounding.
    pub fn scaled(self, multiplier: Decimal) -> Result<Rate, AmountError> {
        if multiplier.is_sign_negative() && !multiplier.is_zero() {
            return Err(AmountError::Negative);
        }
        let product = self
            .0
            .checked_mul(multiplier)
            .ok_or(AmountError::Overflow)?;
        let rounded = product
            .round_dp_with_strategy(RATE_SCALE_MAX, rust_decimal::RoundingStrategy::AwayFromZero);
        Rate::new(rounded)
    }
}

impl Quantity {
    pub const ZERO: Quantity = Quantity(Decimal::ZERO);
    pub const ONE: Quantity = Quantity(Decimal::ONE);

    pub fn new(value: Decimal) -> Result<Self, AmountError> {
        bounded(value, QUANTITY_SCALE_MAX, QUANTITY_UNITS_MAX).map(Quantity)
    }

    pub fn parse(text: &str) -> Result<Self, AmountError> {
        Quantity::new(parse_decimal_text(text)?)
    }

    pub fn from_units(units: u64) -> Result<Self, AmountError> {
        Quantity::new(Decimal::from(units))
    }

    pub fn as_decimal(self) -> Decimal {
        self.0
    }
}

macro_rules! decimal_text {
    ($type:ident) => {
        impl fmt::Display for $type {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Display::fmt(&self.0, f)
            }
        }
        impl std::str::FromStr for $type {
            type Err = AmountError;
            fn from_str(text: &str) -> Result<Self, Self::Err> {
                $type::parse(text)
            }
        }
        impl TryFrom<String> for $type {
            type Error = AmountError;
            fn try_from(text: String) -> Result<Self, Self::Error> {
                $type::parse(&text)
            }
        }
        impl From<$type> for String {
            fn from(value: $type) -> String {
                value.to_string()
            }
        }
    };
}
decimal_text!(Rate);
decimal_text!(Quantity);

/// `rate × quantity`, rounded up to the next micro-credit.
///
/// Computed on the decimals' integer mantissas in `i128`, so no intermediate step rounds.
/// A result beyond [`Credits::MAX`] is [`AmountError::Overflow`].
pub fn cost(rate: Rate, quantity: Quantity) -> Result<Credits, AmountError> {
    let product = rate
        .0
        .mantissa()
        .checked_mul(quantity.0.mantissa())
        .ok_or(AmountError::Overflow)?;
    debug_assert!(product >= 0, "rates and quantities are never negative");
    let scale = rate.0.scale() + quantity.0.scale();
    let micros = if scale <= CREDITS_SCALE_MAX {
        product
            .checked_mul(pow10(CREDITS_SCALE_MAX - scale))
            .ok_or(AmountError::Overflow)?
    } else {
        let divisor = pow10(scale - CREDITS_SCALE_MAX);
        let whole = product / divisor;
        if product % divisor == 0 {
            whole
        } else {
            whole.checked_add(1).ok_or(AmountError::Overflow)?
        }
    };
    i64::try_from(micros)
        .map(Credits::from_micros)
        .map_err(|_| AmountError::Overflow)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rate(text: &str) -> Rate {
        Rate::parse(text).unwrap()
    }

    fn quantity(text: &str) -> Quantity {
        Quantity::parse(text).unwrap()
    }

    #[test]
    fn cost_is_exact_when_it_fits_micro_credits() {
        assert_eq!(cost(rate("0.5"), quantity("3")).unwrap().to_string(), "1.5");
        assert_eq!(
            cost(rate("2"), quantity("0.25")).unwrap().to_string(),
            "0.5"
        );
        assert_eq!(cost(rate("0"), quantity("1000")).unwrap(), Credits::ZERO);
    }

    #[test]
    fn cost_rounds_up_to_the_next_micro_credit() {
        // 0.0000015 × 1 = 0.0000015 → 0.000002
        assert_eq!(cost(rate("0.0000015"), quantity("1")).unwrap().micros(), 2);
        // 0.000000000001 × 1 still costs one micro-credit: never free by rounding.
        assert_eq!(
            cost(rate("0.000000000001"), quantity("1"))
                .unwrap()
                .micros(),
            1
        );
        // 0.0000015 × 2 = 0.000003 exactly: no rounding.
        assert_eq!(cost(rate("0.0000015"), quantity("2")).unwrap().micros(), 3);
    }

    #[test]
    fn bounds_are_enforced() {
        assert_eq!(Rate::parse("-1"), Err(AmountError::Negative));
        assert_eq!(
            Rate::parse("0.0000000000001"),
            Err(AmountError::TooPrecise {
                scale: 13,
                scale_max: 12
            })
        );
        assert_eq!(Rate::parse("1000000001"), Err(AmountError::Overflow));
        assert_eq!(Quantity::parse("-0.5"), Err(AmountError::Negative));
        assert_eq!(
            Quantity::parse("0.0000001"),
            Err(AmountError::TooPrecise {
                scale: 7,
                scale_max: 6
            })
        );
        assert_eq!(Quantity::parse("1000000000001"), Err(AmountError::Overflow));
        assert_eq!(Quantity::parse("-0").unwrap(), Quantity::ZERO);
    }

    #[test]
    fn the_largest_inputs_overflow_cleanly() {
        let most = cost(
            Rate::new(Decimal::from(RATE_CREDITS_MAX)).unwrap(),
            quantity("1000000000000"),
        );
        assert_eq!(most, Err(AmountError::Overflow));
    }

    #[test]
    fn discounts_round_up() {
        let discounted = rate("0.000000000003").scaled(Decimal::new(5, 1)).unwrap();
        assert_eq!(discounted.to_string(), "0.000000000002");
        assert_eq!(
            rate("10").scaled(Decimal::new(75, 2)).unwrap().to_string(),
            "7.5"
        );
    }
}
