//! Checks of command-line input before anything is sent, each naming the flag at fault.

use std::collections::HashMap;

use tollgate_core::{Credits, Quantity};
use tollgate_proto::pb;

use crate::error::CliError;

/// A credit amount (decimal string, at most 6 decimals) that must be more than zero.
pub fn positive_amount(field: &str, text: &str) -> Result<String, CliError> {
    Credits::parse_positive(text).map_err(|e| CliError::input(field, amount_problem(text, e)))?;
    Ok(text.to_string())
}

/// A credit amount that may be zero (empty: left to the server's default).
pub fn non_negative_amount(field: &str, text: &str) -> Result<String, CliError> {
    if text.is_empty() {
        return Ok(String::new());
    }
    Credits::parse_non_negative(text)
        .map_err(|e| CliError::input(field, amount_problem(text, e)))?;
    Ok(text.to_string())
}

/// A signed, non-zero amount (adjustments).
pub fn nonzero_amount(field: &str, text: &str) -> Result<String, CliError> {
    let amount =
        Credits::parse(text).map_err(|e| CliError::input(field, amount_problem(text, e)))?;
    if amount.is_zero() {
        return Err(CliError::input(field, "must not be zero"));
    }
    Ok(text.to_string())
}

/// A money amount (a cost basis): a plain non-negative decimal.
pub fn money_amount(field: &str, text: &str) -> Result<String, CliError> {
    let plain = !text.is_empty()
        && text.chars().all(|c| c.is_ascii_digit() || c == '.')
        && text.chars().filter(|c| *c == '.').count() <= 1
        && !text.starts_with('.')
        && !text.ends_with('.');
    if !plain {
        return Err(CliError::input(
            field,
            format!("{text:?} is not a plain decimal number"),
        ));
    }
    Ok(text.to_string())
}

fn amount_problem(text: &str, error: impl std::fmt::Display) -> String {
    format!("{text:?}: {error} (amounts are decimal strings such as \"12.5\")")
}

/// An instant: RFC 3339 (`2026-01-31T00:00:00Z`), a date (`2026-01-31`, midnight UTC), or
/// seconds since the epoch.
pub fn time(field: &str, text: &str) -> Result<prost_types::Timestamp, CliError> {
    if let Ok(at) = chrono::DateTime::parse_from_rfc3339(text) {
        return Ok(prost_types::Timestamp {
            seconds: at.timestamp(),
            nanos: i32::try_from(at.timestamp_subsec_nanos()).unwrap_or(0),
        });
    }
    if let Ok(date) = chrono::NaiveDate::parse_from_str(text, "%Y-%m-%d") {
        if let Some(midnight) = date.and_hms_opt(0, 0, 0) {
            return Ok(prost_types::Timestamp {
                seconds: midnight.and_utc().timestamp(),
                nanos: 0,
            });
        }
    }
    if let Ok(seconds) = text.parse::<i64>() {
        return Ok(prost_types::Timestamp { seconds, nanos: 0 });
    }
    Err(CliError::input(
        field,
        format!("{text:?} is not a time (use RFC 3339 such as 2026-01-31T00:00:00Z, a date 2026-01-31, or epoch seconds)"),
    ))
}

/// This instant, to the second (defaults the server asks the caller to choose).
pub fn now() -> prost_types::Timestamp {
    let seconds = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|elapsed| i64::try_from(elapsed.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0);
    prost_types::Timestamp { seconds, nanos: 0 }
}

pub fn optional_time(
    field: &str,
    text: &Option<String>,
) -> Result<Option<prost_types::Timestamp>, CliError> {
    text.as_deref().map(|t| time(field, t)).transpose()
}

/// `key=value` pairs.
pub fn metadata(field: &str, pairs: &[String]) -> Result<HashMap<String, String>, CliError> {
    let mut map = HashMap::new();
    for pair in pairs {
        let (key, value) = pair
            .split_once('=')
            .ok_or_else(|| CliError::input(field, format!("{pair:?} is not key=value")))?;
        if key.is_empty() {
            return Err(CliError::input(field, format!("{pair:?} has an empty key")));
        }
        map.insert(key.to_string(), value.to_string());
    }
    Ok(map)
}

pub fn source(field: &str, text: &str) -> Result<pb::GrantSource, CliError> {
    Ok(match text.to_ascii_lowercase().replace('-', "_").as_str() {
        "purchase" => pb::GrantSource::Purchase,
        "subscription" => pb::GrantSource::Subscription,
        "promo" => pb::GrantSource::Promo,
        "trial" => pb::GrantSource::Trial,
        "top_up" | "topup" => pb::GrantSource::TopUp,
        _ => {
            return Err(CliError::input(
                field,
                format!("{text:?} is not one of purchase, subscription, promo, trial, top-up"),
            ))
        }
    })
}

pub fn entry_kind(field: &str, text: &str) -> Result<pb::EntryKind, CliError> {
    pb::EntryKind::from_str_name(&format!("ENTRY_KIND_{}", text.to_ascii_uppercase()))
        .filter(|kind| *kind != pb::EntryKind::Unspecified)
        .ok_or_else(|| {
            CliError::input(
                field,
                format!(
                    "{text:?} is not one of grant, debit, refund, expire, rollover, void, adjust, settle"
                ),
            )
        })
}

pub fn mode(field: &str, text: &Option<String>) -> Result<pb::EnforcementMode, CliError> {
    Ok(match text.as_deref() {
        None => pb::EnforcementMode::Unspecified,
        Some("strict") => pb::EnforcementMode::Strict,
        Some("cached") => pb::EnforcementMode::Cached,
        Some(other) => {
            return Err(CliError::input(
                field,
                format!("{other:?} is not strict or cached"),
            ))
        }
    })
}

pub fn period_unit(field: &str, text: &str) -> Result<pb::PeriodUnit, CliError> {
    Ok(match text.to_ascii_lowercase().trim_end_matches('s') {
        "day" => pb::PeriodUnit::Day,
        "week" => pb::PeriodUnit::Week,
        "month" => pb::PeriodUnit::Month,
        "year" => pb::PeriodUnit::Year,
        _ => {
            return Err(CliError::input(
                field,
                format!("{text:?} is not one of day, week, month, year"),
            ))
        }
    })
}

/// `none`, `full`, `max:CAP`, `percent:P` or `percent:P:CAP`.
pub fn rollover(field: &str, text: &str) -> Result<pb::RolloverPolicy, CliError> {
    use pb::rollover_policy::{Percent, Policy};
    let mut parts = text.split(':');
    let policy = match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some("none"), None, ..) => Policy::None(true),
        (Some("full"), None, ..) => Policy::Full(true),
        (Some("max"), Some(cap), None, _) => Policy::Max(positive_amount(field, cap)?),
        (Some("percent"), Some(percent), cap, None) => Policy::Percent(Percent {
            percent: non_negative_amount(field, percent)?,
            cap: cap
                .map(|cap| positive_amount(field, cap))
                .transpose()?
                .unwrap_or_default(),
        }),
        _ => {
            return Err(CliError::input(
                field,
                format!("{text:?} is not none, full, max:CAP, percent:P or percent:P:CAP"),
            ))
        }
    };
    Ok(pb::RolloverPolicy {
        policy: Some(policy),
    })
}

/// What is being paid for: a feature with a quantity (priced by the price book) or a cost.
pub fn usage(
    feature: &str,
    quantity: &Option<String>,
    cost: &Option<String>,
) -> Result<pb::Usage, CliError> {
    let amount = match (quantity, cost) {
        (Some(quantity), None) => {
            Quantity::parse(quantity)
                .map_err(|e| CliError::input("--quantity", amount_problem(quantity, e)))?;
            pb::usage::Amount::Quantity(quantity.clone())
        }
        (None, Some(cost)) => pb::usage::Amount::Cost(positive_amount("--cost", cost)?),
        (None, None) => pb::usage::Amount::Quantity("1".into()),
        (Some(_), Some(_)) => {
            return Err(CliError::input(
                "--quantity",
                "give --quantity or --cost, not both",
            ))
        }
    };
    Ok(pb::Usage {
        feature: feature.to_string(),
        amount: Some(amount),
    })
}

/// A fresh idempotency key: `cli-` and 16 random bytes in hex.
pub fn generated_key() -> Result<String, CliError> {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes)
        .map_err(|e| CliError::Other(format!("no randomness for an idempotency key: {e}")))?;
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    Ok(format!("cli-{hex}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn amounts_name_the_flag() {
        let error = positive_amount("--amount", "1e3").unwrap_err();
        assert!(error.to_string().starts_with("--amount: "), "{error}");
        assert!(positive_amount("--amount", "0").is_err());
        assert_eq!(positive_amount("--amount", "12.5").unwrap(), "12.5");
        assert!(nonzero_amount("--amount", "-3").is_ok());
        assert!(nonzero_amount("--amount", "0").is_err());
    }

    #[test]
    fn times_take_three_forms() {
        assert_eq!(time("--from", "1970-01-02").unwrap().seconds, 86_400);
        assert_eq!(time("--from", "1970-01-01T00:01:00Z").unwrap().seconds, 60);
        assert_eq!(time("--from", "5").unwrap().seconds, 5);
        assert!(time("--from", "yesterday").is_err());
    }

    #[test]
    fn rollover_policies() {
        assert!(rollover("--rollover", "max:10").is_ok());
        assert!(rollover("--rollover", "percent:50:100").is_ok());
        assert!(rollover("--rollover", "some").is_err());
    }

    #[test]
    fn generated_keys_differ() {
        assert_ne!(generated_key().unwrap(), generated_key().unwrap());
    }
}
