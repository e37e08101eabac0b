//! Holds: credits set aside by `Authorize`, then captured, released or expired.
//!
//! ```text
//! pending ──capture(≤ held)──▶ captured
//!    │ ──release──────────────▶ released
//!    └ ──TTL passes───────────▶ expired
//! ```
//! Every other transition is a [`HoldError`]. A hold past its TTL is expired whether or not
//! anyone has told it yet: [`Hold::status_at`] says so, and capture or release are refused.

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::burn::BurnPlan;
use crate::credits::Credits;
use crate::ids::{FeatureKey, HoldId};
use crate::time::Timestamp;

/// Shortest hold TTL, in milliseconds.
pub const HOLD_TTL_MS_MIN: i64 = 1_000;
/// Longest hold TTL, in milliseconds (7 days).
pub const HOLD_TTL_MS_MAX: i64 = 7 * 24 * 3_600_000;
/// Hold TTL when the caller names none, in milliseconds (15 minutes).
pub const HOLD_TTL_MS_DEFAULT: i64 = 15 * 60_000;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HoldStatus {
    Pending,
    Captured { captured: Credits },
    Released,
    Expired,
}

#[derive(Clone, Copy, Debug, Error, PartialEq, Eq, Serialize, Deserialize)]
pub enum HoldError {
    #[error("hold was already captured")]
    AlreadyCaptured,
    #[error("hold was already released")]
    AlreadyReleased,
    #[error("hold expired")]
    Expired,
    #[error("hold does not expire until {expires_at}")]
    NotYetExpired { expires_at: Timestamp },
    #[error("capture of {requested} exceeds the {held} held")]
    CaptureExceedsHold { held: Credits, requested: Credits },
    #[error("capture amount is negative")]
    NegativeCapture,
}

/// An authorization and the draws it set aside.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hold {
    pub id: HoldId,
    pub feature: FeatureKey,
    pub amount: Credits,
    pub reserved: BurnPlan,
    pub created_at: Timestamp,
    pub expires_at: Timestamp,
    pub status: HoldStatus,
}

/// What a capture moves: `captured` becomes a debit, `released` goes back to the grants.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Capture {
    pub captured: BurnPlan,
    pub released: BurnPlan,
}

impl Hold {
    /// A pending hold over `reserved`, whose total is the held amount.
    pub fn new(
        id: HoldId,
        feature: FeatureKey,
        reserved: BurnPlan,
        created_at: Timestamp,
        expires_at: Timestamp,
    ) -> Self {
        let amount = reserved.total().unwrap_or(Credits::MAX);
        debug_assert!(created_at < expires_at, "a hold expires after it is made");
        Hold {
            id,
            feature,
            amount,
            reserved,
            created_at,
            expires_at,
            status: HoldStatus::Pending,
        }
    }

    /// The status as of `now`: a pending hold past its TTL reads as expired.
    pub fn status_at(&self, now: Timestamp) -> HoldStatus {
        match self.status {
            HoldStatus::Pending if now >= self.expires_at => HoldStatus::Expired,
            status => status,
        }
    }

    fn require_pending(&self, now: Timestamp) -> Result<(), HoldError> {
        match self.status_at(now) {
            HoldStatus::Pending => Ok(()),
            HoldStatus::Captured { .. } => Err(HoldError::AlreadyCaptured),
            HoldStatus::Released => Err(HoldError::AlreadyReleased),
            HoldStatus::Expired => Err(HoldError::Expired),
        }
    }

    /// Takes `amount` (at most what is held) and gives the rest back.
    pub fn capture(&mut self, amount: Credits, now: Timestamp) -> Result<Capture, HoldError> {
        self.require_pending(now)?;
        if amount.is_negative() {
            return Err(HoldError::NegativeCapture);
        }
        if amount > self.amount {
            return Err(HoldError::CaptureExceedsHold {
                held: self.amount,
                requested: amount,
            });
        }
        let (captured, released) = self.reserved.split_at(amount);
        self.status = HoldStatus::Captured { captured: amount };
        Ok(Capture { captured, released })
    }

    /// Gives everything back; returns what is released.
    pub fn release(&mut self, now: Timestamp) -> Result<BurnPlan, HoldError> {
        self.require_pending(now)?;
        self.status = HoldStatus::Released;
        Ok(self.reserved.clone())
    }

    /// Records that the TTL has passed; returns what goes back. Refused before the TTL.
    pub fn expire(&mut self, now: Timestamp) -> Result<BurnPlan, HoldError> {
        match self.status {
            HoldStatus::Pending if now >= self.expires_at => {
                self.status = HoldStatus::Expired;
                Ok(self.reserved.clone())
            }
            HoldStatus::Pending => Err(HoldError::NotYetExpired {
                expires_at: self.expires_at,
            }),
            HoldStatus::Captured { .. } => Err(HoldError::AlreadyCaptured),
            HoldStatus::Released => Err(HoldError::AlreadyReleased),
            HoldStatus::Expired => Err(HoldError::Expired),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::burn::Draw;
    use crate::ids::GrantId;

    fn at(millis: i64) -> Timestamp {
        Timestamp::from_millis(millis).unwrap()
    }

    fn credits(text: &str) -> Credits {
        Credits::parse(text).unwrap()
    }

    fn hold() -> Hold {
        let reserved = BurnPlan {
            draws: vec![Draw {
                grant_id: GrantId::new("g").unwrap(),
                amount: credits("4"),
            }],
            overdraft: credits("1"),
        };
        Hold::new(
            HoldId::new("h").unwrap(),
            FeatureKey::new("f").unwrap(),
            reserved,
            at(0),
            at(10_000),
        )
    }

    #[test]
    fn partial_capture_releases_the_rest() {
        let mut h = hold();
        assert_eq!(h.amount, credits("5"));
        let capture = h.capture(credits("3.5"), at(5)).unwrap();
        assert_eq!(capture.captured.total().unwrap(), credits("3.5"));
        assert_eq!(capture.released.total().unwrap(), credits("1.5"));
        assert_eq!(capture.released.overdraft, credits("1"));
        assert_eq!(
            h.status,
            HoldStatus::Captured {
                captured: credits("3.5")
            }
        );
    }

    #[test]
    fn capture_never_takes_more_than_held() {
        let mut h = hold();
        assert_eq!(
            h.capture(credits("5.000001"), at(5)),
            Err(HoldError::CaptureExceedsHold {
                held: credits("5"),
                requested: credits("5.000001")
            })
        );
        assert_eq!(
            h.status,
            HoldStatus::Pending,
            "a refused capture changes nothing"
        );
        assert!(h.capture(credits("5"), at(5)).is_ok());
    }

    #[test]
    fn illegal_transitions_are_typed() {
        let mut h = hold();
        h.release(at(5)).unwrap();
        assert_eq!(
            h.capture(credits("1"), at(6)),
            Err(HoldError::AlreadyReleased)
        );
        assert_eq!(h.release(at(6)), Err(HoldError::AlreadyReleased));
        assert_eq!(h.expire(at(20_000)), Err(HoldError::AlreadyReleased));

        let mut h = hold();
        h.capture(credits("1"), at(5)).unwrap();
        assert_eq!(
            h.capture(credits("1"), at(6)),
            Err(HoldError::AlreadyCaptured)
        );
        assert_eq!(h.release(at(6)), Err(HoldError::AlreadyCaptured));

        let mut h = hold();
        assert_eq!(
            h.expire(at(9_999)),
            Err(HoldError::NotYetExpired {
                expires_at: at(10_000)
            })
        );
        assert_eq!(h.status_at(at(10_000)), HoldStatus::Expired);
        assert_eq!(h.capture(credits("1"), at(10_000)), Err(HoldError::Expired));
        assert_eq!(h.release(at(10_000)), Err(HoldError::Expired));
        assert_eq!(h.expire(at(10_000)).unwrap().total().unwrap(), credits("5"));
        assert_eq!(h.expire(at(10_001)), Err(HoldError::Expired));
    }
}
