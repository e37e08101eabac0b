//! A reference reader of the decimal grammar that amounts, rates and quantities share
//! (`crates/tollgate-core/src/credits.rs`): an optional `-`, digits, optionally `.` and digits,
//! at most `DECIMAL_TEXT_LEN_MAX` bytes; written with integers only, so that the fuzz targets
//! judge the core's parsers against something that does not use `rust_decimal`.

use tollgate_core::credits::DECIMAL_TEXT_LEN_MAX;

/// `text` as a whole number of `10^-scale` units, when it follows the grammar, carries at most
/// `scale` decimals once trailing zeros are dropped ("seven written decimals whose last is zero
/// are six real ones"), and fits an `i128`. `Err` says why not.
pub fn units(text: &str, scale: u32) -> Result<i128, Refusal> {
    if text.is_empty() || text.len() > DECIMAL_TEXT_LEN_MAX {
        return Err(Refusal::Malformed);
    }
    let (negative, unsigned) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text),
    };
    let (whole, fraction) = unsigned.split_once('.').unwrap_or((unsigned, ""));
    let digits = |part: &str| !part.is_empty() && part.bytes().all(|b| b.is_ascii_digit());
    if !digits(whole) || (unsigned.contains('.') && !digits(fraction)) {
        return Err(Refusal::Malformed);
    }
    let fraction = fraction.trim_end_matches('0');
    let decimals = u32::try_from(fraction.len()).map_err(|_| Refusal::TooPrecise)?;
    if decimals > scale {
        return Err(Refusal::TooPrecise);
    }
    let mut value: i128 = 0;
    for byte in whole.bytes().chain(fraction.bytes()) {
        value = value
            .checked_mul(10)
            .and_then(|v| v.checked_add(i128::from(byte - b'0')))
            .ok_or(Refusal::Overflow)?;
    }
    value = 10_i128
        .checked_pow(scale - decimals)
        .and_then(|factor| value.checked_mul(factor))
        .ok_or(Refusal::Overflow)?;
    Ok(if negative { -value } else { value })
}

/// Why [`units`] refused a text.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    Malformed,
    TooPrecise,
    Overflow,
}

/// Whether `text` follows the grammar, whatever its value.
pub fn is_grammatical(text: &str) -> bool {
    // No text of the grammar has more decimals than bytes.
    let scale = u32::try_from(DECIMAL_TEXT_LEN_MAX).unwrap_or(u32::MAX);
    !matches!(units(text, scale), Err(Refusal::Malformed))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_grammar() {
        assert_eq!(units("12.5", 6), Ok(12_500_000));
        assert_eq!(units("-0.000001", 6), Ok(-1));
        assert_eq!(units("0.1234560", 6), Ok(123_456));
        assert_eq!(units("0.0000001", 6), Err(Refusal::TooPrecise));
        for text in ["", "+1", "1.", ".5", "1e3", " 1", "--1", "١"] {
            assert_eq!(units(text, 6), Err(Refusal::Malformed), "{text:?}");
        }
    }
}
