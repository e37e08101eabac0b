//! Points in time as the rules see them: milliseconds since the Unix epoch, UTC.
//!
//! The core never reads a clock; every function that needs "now" takes it as an argument.

use std::fmt;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::error::TimeError;

/// The earliest instant accepted: 1970-01-01T00:00:00Z.
pub const TIMESTAMP_MS_MIN: i64 = 0;
/// The latest instant accepted: 9999-12-31T23:59:59.999Z.
pub const TIMESTAMP_MS_MAX: i64 = 253_402_300_799_999;

/// An instant, in milliseconds since the Unix epoch (the resolution Redis scripts use too).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "i64", into = "i64")]
pub struct Timestamp(i64);

impl Timestamp {
    pub const EPOCH: Timestamp = Timestamp(TIMESTAMP_MS_MIN);
    pub const MAX: Timestamp = Timestamp(TIMESTAMP_MS_MAX);

    pub fn from_millis(millis: i64) -> Result<Self, TimeError> {
        if (TIMESTAMP_MS_MIN..=TIMESTAMP_MS_MAX).contains(&millis) {
            Ok(Timestamp(millis))
        } else {
            Err(TimeError::OutOfRange)
        }
    }

    pub const fn millis(self) -> i64 {
        self.0
    }

    /// Sub-millisecond parts are dropped (toward the past), as in every stored timestamp.
    pub fn from_datetime(at: DateTime<Utc>) -> Result<Self, TimeError> {
        Timestamp::from_millis(at.timestamp_millis())
    }

    pub fn to_datetime(self) -> DateTime<Utc> {
        // Every value in range is representable, so this never falls back.
        DateTime::from_timestamp_millis(self.0).unwrap_or(DateTime::<Utc>::MIN_UTC)
    }

    /// Parses RFC 3339 (`2026-01-31T00:00:00Z`).
    pub fn parse_rfc3339(text: &str) -> Result<Self, TimeError> {
        let at = DateTime::parse_from_rfc3339(text).map_err(|_| TimeError::Malformed)?;
        Timestamp::from_datetime(at.with_timezone(&Utc))
    }

    pub fn checked_add_ms(self, millis: i64) -> Result<Self, TimeError> {
        let sum = self.0.checked_add(millis).ok_or(TimeError::OutOfRange)?;
        Timestamp::from_millis(sum)
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}",
            self.to_datetime()
                .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
        )
    }
}

impl Default for Timestamp {
    fn default() -> Self {
        Timestamp::EPOCH
    }
}

impl TryFrom<i64> for Timestamp {
    type Error = TimeError;
    fn try_from(millis: i64) -> Result<Self, Self::Error> {
        Timestamp::from_millis(millis)
    }
}

impl From<Timestamp> for i64 {
    fn from(at: Timestamp) -> i64 {
        at.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn range_and_text() {
        let at = Timestamp::parse_rfc3339("2026-01-31T12:00:00.250Z").unwrap();
        assert_eq!(at.to_string(), "2026-01-31T12:00:00.250Z");
        assert_eq!(Timestamp::from_millis(-1), Err(TimeError::OutOfRange));
        assert_eq!(Timestamp::MAX.checked_add_ms(1), Err(TimeError::OutOfRange));
        assert_eq!(Timestamp::MAX.to_string(), "9999-12-31T23:59:59.999Z");
        assert_eq!(
            Timestamp::parse_rfc3339("yesterday"),
            Err(TimeError::Malformed)
        );
    }
}
