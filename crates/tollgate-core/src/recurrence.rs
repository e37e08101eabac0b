//! Recurring grants and rollover at period end.
//!
//! Period `k` of a schedule is `[boundary(k), boundary(k + 1))` with `boundary(k)` computed from
//! the anchor directly (never from `boundary(k - 1)`), so month periods clamp to month end and
//! then recover: an anchor on Jan 31 gives Feb 28 (or 29), then Mar 31. Periods therefore tile
//! time with no gap and no overlap.

use chrono::{DateTime, Months, Utc};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::credits::{pow10, Credits};
use crate::grant::{Grant, GrantSource, Scope};
use crate::ids::GrantId;
use crate::time::Timestamp;

/// Most units one period may span (`every 1000 days`).
pub const PERIOD_COUNT_MAX: u32 = 1_000;
const DAY_MS: i64 = 86_400_000;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PeriodUnit {
    Day,
    Week,
    Month,
    Year,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Period {
    pub unit: PeriodUnit,
    /// Units per period, 1..=[`PERIOD_COUNT_MAX`].
    pub count: u32,
}

#[derive(Clone, Copy, Debug, Error, PartialEq, Eq)]
pub enum ScheduleError {
    #[error("period count must be 1..={PERIOD_COUNT_MAX}")]
    BadPeriodCount,
    #[error("period boundary falls outside the supported time range")]
    OutOfRange,
    #[error("percent must be within 0..=100")]
    BadPercent,
    #[error("cap must not be negative")]
    NegativeCap,
    #[error("amount must be more than zero")]
    AmountNotPositive,
}

/// A calendar of periods starting at an anchor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Recurrence {
    pub anchor: Timestamp,
    pub period: Period,
}

impl Recurrence {
    pub fn new(anchor: Timestamp, unit: PeriodUnit, count: u32) -> Result<Self, ScheduleError> {
        if !(1..=PERIOD_COUNT_MAX).contains(&count) {
            return Err(ScheduleError::BadPeriodCount);
        }
        Ok(Recurrence {
            anchor,
            period: Period { unit, count },
        })
    }

    /// The start of period `index` (period 0 starts at the anchor).
    pub fn boundary(&self, index: u64) -> Result<Timestamp, ScheduleError> {
        let count = u64::from(self.period.count);
        let steps = index.checked_mul(count).ok_or(ScheduleError::OutOfRange)?;
        let fixed = |unit_ms: i64| -> Result<Timestamp, ScheduleError> {
            let offset = i64::try_from(steps)
                .ok()
                .and_then(|steps| steps.checked_mul(unit_ms))
                .ok_or(ScheduleError::OutOfRange)?;
            self.anchor
                .checked_add_ms(offset)
                .map_err(|_| ScheduleError::OutOfRange)
        };
        let calendar = |months: u64| -> Result<Timestamp, ScheduleError> {
            let months = u32::try_from(months).map_err(|_| ScheduleError::OutOfRange)?;
            let anchor: DateTime<Utc> = self.anchor.to_datetime();
            let at = anchor
                .checked_add_months(Months::new(months))
                .ok_or(ScheduleError::OutOfRange)?;
            Timestamp::from_datetime(at).map_err(|_| ScheduleError::OutOfRange)
        };
        match self.period.unit {
            PeriodUnit::Day => fixed(DAY_MS),
            PeriodUnit::Week => fixed(7 * DAY_MS),
            PeriodUnit::Month => calendar(steps),
            PeriodUnit::Year => calendar(steps.checked_mul(12).ok_or(ScheduleError::OutOfRange)?),
        }
    }

    /// `[start, end)` of period `index`.
    pub fn period(&self, index: u64) -> Result<(Timestamp, Timestamp), ScheduleError> {
        let next = index.checked_add(1).ok_or(ScheduleError::OutOfRange)?;
        Ok((self.boundary(index)?, self.boundary(next)?))
    }

    /// The index of the period containing `at`, or `None` before the anchor.
    pub fn index_at(&self, at: Timestamp) -> Result<Option<u64>, ScheduleError> {
        if at < self.anchor {
            return Ok(None);
        }
        let elapsed_ms = at.millis() - self.anchor.millis();
        // An estimate from the shortest possible period, then a walk forward: calendar periods
        // vary in length by a few days at most, so the walk is a handful of steps.
        let shortest_ms = match self.period.unit {
            PeriodUnit::Day => DAY_MS,
            PeriodUnit::Week => 7 * DAY_MS,
            PeriodUnit::Month => 28 * DAY_MS,
            PeriodUnit::Year => 365 * DAY_MS,
        } * i64::from(self.period.count);
        let mut index =
            u64::try_from(elapsed_ms / shortest_ms).map_err(|_| ScheduleError::OutOfRange)?;
        loop {
            match self.boundary(index) {
                Ok(start) if start <= at => break,
                // Index 0 is the anchor, at or before `at`, so this never goes below zero.
                Ok(_) | Err(ScheduleError::OutOfRange) => index = index.saturating_sub(1),
                Err(other) => return Err(other),
            }
        }
        loop {
            let next = index.checked_add(1).ok_or(ScheduleError::OutOfRange)?;
            match self.boundary(next) {
                Ok(start) if start <= at => index = next,
                Ok(_) | Err(ScheduleError::OutOfRange) => return Ok(Some(index)),
                Err(other) => return Err(other),
            }
        }
    }
}

/// What happens to a period grant's remainder when its period ends.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RolloverPolicy {
    /// Everything left expires (monthly quotas).
    #[default]
    None,
    /// Everything left carries over.
    Full,
    /// Up to `cap` carries over.
    Max { cap: Credits },
    /// `percent` of what is left carries over (rounded down to the micro-credit), at most `cap`.
    Percent {
        percent: Decimal,
        cap: Option<Credits>,
    },
}

/// A remainder split by a rollover policy: `carried + expired == remaining`, always.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolloverSplit {
    pub carried: Credits,
    pub expired: Credits,
}

impl RolloverPolicy {
    pub fn validate(&self) -> Result<(), ScheduleError> {
        match self {
            RolloverPolicy::None | RolloverPolicy::Full => Ok(()),
            RolloverPolicy::Max { cap } if cap.is_negative() => Err(ScheduleError::NegativeCap),
            RolloverPolicy::Max { .. } => Ok(()),
            RolloverPolicy::Percent { percent, cap } => {
                if percent.is_sign_negative() && !percent.is_zero()
                    || *percent > Decimal::ONE_HUNDRED
                {
                    return Err(ScheduleError::BadPercent);
                }
                if cap.is_some_and(Credits::is_negative) {
                    return Err(ScheduleError::NegativeCap);
                }
                Ok(())
            }
        }
    }

    /// Splits what is left of a period's grant into what carries over and what expires.
    pub fn split(&self, remaining: Credits) -> RolloverSplit {
        debug_assert!(
            self.validate().is_ok(),
            "rollover policy was validated when it was set"
        );
        let remaining = remaining.max(Credits::ZERO);
        let carried = match *self {
            RolloverPolicy::None => Credits::ZERO,
            RolloverPolicy::Full => remaining,
            RolloverPolicy::Max { cap } => remaining.min(cap),
            RolloverPolicy::Percent { percent, cap } => {
                let share = percent_floor(remaining, percent);
                cap.map_or(share, |cap| share.min(cap))
            }
        };
        let carried = carried.clamp(Credits::ZERO, remaining);
        RolloverSplit {
            carried,
            expired: Credits::from_micros(remaining.micros() - carried.micros()),
        }
    }
}

/// `amount × percent / 100`, rounded down to the micro-credit, computed in integers.
fn percent_floor(amount: Credits, percent: Decimal) -> Credits {
    let percent = percent.normalize();
    // percent = mantissa / 10^scale, so share = amount × mantissa / (100 × 10^scale).
    let numerator = i128::from(amount.micros()).saturating_mul(percent.mantissa());
    let denominator = 100_i128.saturating_mul(pow10(percent.scale()));
    let share = numerator / denominator;
    Credits::from_micros(i64::try_from(share).unwrap_or(amount.micros()))
}

/// A recurring grant: one grant per period, with a rollover policy at each period end.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GrantSchedule {
    pub id: String,
    pub recurrence: Recurrence,
    pub amount: Credits,
    pub priority: u32,
    pub scope: Scope,
    pub source: GrantSource,
    pub rollover: RolloverPolicy,
}

/// The movements at the end of one period.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeriodEnd {
    /// What is left of the ending grant, split by the rollover policy.
    pub split: RolloverSplit,
    /// The grant carrying `split.carried`, valid through the next period; `None` when nothing carries.
    pub rollover_grant: Option<Grant>,
    /// The next period's own grant.
    pub next_grant: Grant,
}

impl GrantSchedule {
    pub fn validate(&self) -> Result<(), ScheduleError> {
        if !self.amount.is_positive() {
            return Err(ScheduleError::AmountNotPositive);
        }
        self.rollover.validate()
    }

    /// Grant ids are derived from the schedule and the period, so issuing twice is detectable.
    pub fn grant_id(&self, index: u64) -> Option<GrantId> {
        GrantId::new(format!("{}.p{index}", self.id)).ok()
    }

    fn rollover_grant_id(&self, index: u64) -> Option<GrantId> {
        GrantId::new(format!("{}.p{index}.rollover", self.id)).ok()
    }

    /// The grant of period `index`: effective at its start, expiring at its end.
    pub fn grant_for_period(&self, index: u64) -> Result<Grant, ScheduleError> {
        let (start, end) = self.recurrence.period(index)?;
        let id = self.grant_id(index).ok_or(ScheduleError::OutOfRange)?;
        Ok(Grant::new(id, self.amount, self.source, start)
            .with_priority(self.priority)
            .with_expiry(end)
            .with_scope(self.scope.clone()))
    }

    /// The movements when period `index` ends with `remaining` left on its grant: the carried
    /// part becomes a `rollover` grant (priority 5, so it burns first, valid through the next
    /// period), the rest expires, and the next period's grant is issued. Rollover grants do not
    /// roll over again; they expire at their own end.
    pub fn end_period(&self, index: u64, remaining: Credits) -> Result<PeriodEnd, ScheduleError> {
        let split = self.rollover.split(remaining);
        let next = index.checked_add(1).ok_or(ScheduleError::OutOfRange)?;
        let next_grant = self.grant_for_period(next)?;
        let rollover_grant = if split.carried.is_positive() {
            let id = self
                .rollover_grant_id(index)
                .ok_or(ScheduleError::OutOfRange)?;
            let (start, end) = self.recurrence.period(next)?;
            Some(
                Grant::new(id, split.carried, GrantSource::Rollover, start)
                    .with_expiry(end)
                    .with_scope(self.scope.clone()),
            )
        } else {
            None
        };
        Ok(PeriodEnd {
            split,
            rollover_grant,
            next_grant,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(text: &str) -> Timestamp {
        Timestamp::parse_rfc3339(text).unwrap()
    }

    fn credits(text: &str) -> Credits {
        Credits::parse(text).unwrap()
    }

    #[test]
    fn month_end_clamps_then_recovers() {
        let monthly = Recurrence::new(ts("2027-01-31T00:00:00Z"), PeriodUnit::Month, 1).unwrap();
        let starts: Vec<String> = (0..4)
            .map(|k| monthly.boundary(k).unwrap().to_string())
            .collect();
        assert_eq!(
            starts,
            [
                "2027-01-31T00:00:00.000Z",
                "2027-02-28T00:00:00.000Z",
                "2027-03-31T00:00:00.000Z",
                "2027-04-30T00:00:00.000Z"
            ]
        );
        let leap = Recurrence::new(ts("2028-01-31T00:00:00Z"), PeriodUnit::Month, 1).unwrap();
        assert_eq!(leap.boundary(1).unwrap(), ts("2028-02-29T00:00:00Z"));
    }

    #[test]
    fn yearly_from_a_leap_day() {
        let yearly = Recurrence::new(ts("2028-02-29T12:00:00Z"), PeriodUnit::Year, 1).unwrap();
        assert_eq!(yearly.boundary(1).unwrap(), ts("2029-02-28T12:00:00Z"));
        assert_eq!(yearly.boundary(4).unwrap(), ts("2032-02-29T12:00:00Z"));
    }

    #[test]
    fn index_at_finds_the_containing_period() {
        let monthly = Recurrence::new(ts("2027-01-31T00:00:00Z"), PeriodUnit::Month, 1).unwrap();
        assert_eq!(monthly.index_at(ts("2027-01-30T23:59:59Z")).unwrap(), None);
        assert_eq!(
            monthly.index_at(ts("2027-01-31T00:00:00Z")).unwrap(),
            Some(0)
        );
        assert_eq!(
            monthly.index_at(ts("2027-02-27T23:59:59.999Z")).unwrap(),
            Some(0)
        );
        assert_eq!(
            monthly.index_at(ts("2027-02-28T00:00:00Z")).unwrap(),
            Some(1)
        );
        assert_eq!(
            monthly.index_at(ts("2037-03-31T00:00:00Z")).unwrap(),
            Some(122)
        );
    }

    #[test]
    fn rollover_policies() {
        let left = credits("40");
        assert_eq!(
            RolloverPolicy::None.split(left),
            RolloverSplit {
                carried: Credits::ZERO,
                expired: left
            }
        );
        assert_eq!(
            RolloverPolicy::Full.split(left),
            RolloverSplit {
                carried: left,
                expired: Credits::ZERO
            }
        );
        assert_eq!(
            RolloverPolicy::Max { cap: credits("25") }.split(left),
            RolloverSplit {
                carried: credits("25"),
                expired: credits("15")
            }
        );
        let half = RolloverPolicy::Percent {
            percent: Decimal::new(50, 0),
            cap: None,
        };
        assert_eq!(
            half.split(credits("0.000003")),
            RolloverSplit {
                carried: Credits::MICRO,
                expired: credits("0.000002")
            }
        );
        let capped = RolloverPolicy::Percent {
            percent: Decimal::new(50, 0),
            cap: Some(credits("10")),
        };
        assert_eq!(capped.split(left).carried, credits("10"));
        assert_eq!(
            RolloverPolicy::Percent {
                percent: Decimal::new(1001, 1),
                cap: None
            }
            .validate(),
            Err(ScheduleError::BadPercent)
        );
    }

    #[test]
    fn end_period_issues_rollover_and_next_grant() {
        let schedule = GrantSchedule {
            id: "acme.pro".into(),
            recurrence: Recurrence::new(ts("2027-01-31T00:00:00Z"), PeriodUnit::Month, 1).unwrap(),
            amount: credits("100"),
            priority: 10,
            scope: Scope::All,
            source: GrantSource::Subscription,
            rollover: RolloverPolicy::Max { cap: credits("30") },
        };
        let end = schedule.end_period(0, credits("45")).unwrap();
        assert_eq!(
            end.split,
            RolloverSplit {
                carried: credits("30"),
                expired: credits("15")
            }
        );
        let rollover = end.rollover_grant.unwrap();
        assert_eq!(rollover.amount, credits("30"));
        assert_eq!(rollover.priority, 5);
        assert_eq!(rollover.effective_at, ts("2027-02-28T00:00:00Z"));
        assert_eq!(rollover.expires_at, Some(ts("2027-03-31T00:00:00Z")));
        assert_eq!(end.next_grant.id.as_str(), "acme.pro.p1");
        assert_eq!(end.next_grant.expires_at, Some(ts("2027-03-31T00:00:00Z")));
        assert!(schedule
            .end_period(0, Credits::ZERO)
            .unwrap()
            .rollover_grant
            .is_none());
    }
}
