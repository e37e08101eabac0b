//! The burn-down planner: which grants pay for a cost, and how much each.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::credits::Credits;
use crate::error::AmountError;
use crate::grant::{burn_order, Grant};
use crate::ids::{FeatureKey, GrantId};
use crate::time::Timestamp;

/// Credits taken from one grant.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Draw {
    pub grant_id: GrantId,
    pub amount: Credits,
}

/// How a cost is paid: draws in burn-down order, then what goes into overdraft.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BurnPlan {
    pub draws: Vec<Draw>,
    /// Credits beyond the grants, taken within the overdraft limit (the balance goes negative).
    pub overdraft: Credits,
}

impl BurnPlan {
    /// What the plan pays in all.
    pub fn total(&self) -> Result<Credits, AmountError> {
        Credits::checked_sum(self.draws.iter().map(|draw| draw.amount))?.checked_add(self.overdraft)
    }

    /// Splits the plan in two: the first `amount` credits (draws in order, overdraft last) and
    /// the rest. A capture keeps the first part and gives the rest back, so what it releases
    /// comes off the overdraft first.
    pub fn split_at(&self, amount: Credits) -> (BurnPlan, BurnPlan) {
        let mut taken = BurnPlan::default();
        let mut rest = BurnPlan::default();
        let mut left = amount.micros().max(0);
        for draw in &self.draws {
            let take = left.min(draw.amount.micros());
            left -= take;
            let give = draw.amount.micros() - take;
            if take > 0 {
                taken.draws.push(Draw {
                    grant_id: draw.grant_id.clone(),
                    amount: Credits::from_micros(take),
                });
            }
            if give > 0 {
                rest.draws.push(Draw {
                    grant_id: draw.grant_id.clone(),
                    amount: Credits::from_micros(give),
                });
            }
        }
        let take = left.min(self.overdraft.micros());
        taken.overdraft = Credits::from_micros(take);
        rest.overdraft = Credits::from_micros(self.overdraft.micros() - take);
        (taken, rest)
    }
}

/// Credits already set aside by pending holds, per grant and in overdraft. The planner treats
/// them as spent, so two holds never count on the same credits.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Reserved {
    by_grant: BTreeMap<GrantId, Credits>,
    overdraft: Credits,
}

impl Reserved {
    pub fn add(&mut self, plan: &BurnPlan) -> Result<(), AmountError> {
        for draw in &plan.draws {
            let held = self.by_grant.entry(draw.grant_id.clone()).or_default();
            *held = held.checked_add(draw.amount)?;
        }
        self.overdraft = self.overdraft.checked_add(plan.overdraft)?;
        Ok(())
    }

    pub fn on_grant(&self, grant: &GrantId) -> Credits {
        self.by_grant.get(grant).copied().unwrap_or_default()
    }

    pub fn overdraft(&self) -> Credits {
        self.overdraft
    }
}

/// One question to the planner: may this account spend `cost` on `feature` at `at`?
#[derive(Clone, Copy, Debug)]
pub struct BurnRequest<'a> {
    pub feature: &'a FeatureKey,
    pub at: Timestamp,
    pub cost: Credits,
    /// How far below zero the balance may go (zero or more).
    pub overdraft_limit: Credits,
    /// How far below zero it already is (zero or more).
    pub debt: Credits,
}

/// A refusal: the account cannot pay.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shortfall {
    pub cost: Credits,
    /// What could have been spent: eligible grants less holds, plus overdraft room.
    pub available: Credits,
    /// `cost - available`.
    pub shortfall: Credits,
}

/// Plans the draws that pay `request.cost`, in burn-down order, or says how much is missing.
///
/// Eligible grants are active at `at` (`effective_at <= at < expires_at`, open), cover the
/// feature, and have credits left once pending holds are taken off. Whatever they cannot pay
/// goes into overdraft, down to `-overdraft_limit`.
pub fn plan_burn<'g>(
    grants: impl IntoIterator<Item = &'g Grant>,
    reserved: &Reserved,
    request: &BurnRequest<'_>,
) -> Result<BurnPlan, Shortfall> {
    debug_assert!(!request.cost.is_negative(), "a cost is never negative");
    let mut eligible: Vec<(&Grant, Credits)> = grants
        .into_iter()
        .filter(|grant| grant.is_eligible(request.feature, request.at))
        .map(|grant| {
            debug_assert!(
                grant.validate().is_ok(),
                "grant {} breaks its invariants",
                grant.id
            );
            (
                grant,
                grant
                    .remaining
                    .saturating_sub_floor_zero(reserved.on_grant(&grant.id)),
            )
        })
        .filter(|(_, available)| available.is_positive())
        .collect();
    eligible.sort_by(|(a, _), (b, _)| burn_order(a, b));

    let mut plan = BurnPlan::default();
    // Every quantity below is bounded by `cost` or by one grant's remaining, so plain i64
    // arithmetic on micro-credits cannot overflow; sums use saturating adds to stay total.
    let mut left = request.cost.micros();
    let mut from_grants: i64 = 0;
    for (grant, available) in eligible {
        from_grants = from_grants.saturating_add(available.micros());
        if left == 0 {
            continue;
        }
        let take = left.min(available.micros());
        left -= take;
        plan.draws.push(Draw {
            grant_id: grant.id.clone(),
            amount: Credits::from_micros(take),
        });
    }
    let overdraft_room = request
        .overdraft_limit
        .saturating_sub_floor_zero(request.debt)
        .saturating_sub_floor_zero(reserved.overdraft());
    if left <= overdraft_room.micros() {
        plan.overdraft = Credits::from_micros(left);
        return Ok(plan);
    }
    let available = Credits::from_micros(from_grants.saturating_add(overdraft_room.micros()));
    Err(Shortfall {
        cost: request.cost,
        available,
        shortfall: request.cost.saturating_sub_floor_zero(available),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::grant::{GrantSource, Scope};

    fn at(millis: i64) -> Timestamp {
        Timestamp::from_millis(millis).unwrap()
    }

    fn credits(text: &str) -> Credits {
        Credits::parse(text).unwrap()
    }

    fn grant(id: &str, amount: &str) -> Grant {
        Grant::new(
            GrantId::new(id).unwrap(),
            credits(amount),
            GrantSource::Purchase,
            at(1_000),
        )
    }

    fn feature() -> FeatureKey {
        FeatureKey::new("ai_message_gen").unwrap()
    }

    fn request<'a>(
        feature: &'a FeatureKey,
        at_ms: i64,
        cost: &str,
        overdraft: &str,
    ) -> BurnRequest<'a> {
        BurnRequest {
            feature,
            at: at(at_ms),
            cost: credits(cost),
            overdraft_limit: credits(overdraft),
            debt: Credits::ZERO,
        }
    }

    fn summary(plan: &BurnPlan) -> Vec<(String, String)> {
        plan.draws
            .iter()
            .map(|d| (d.grant_id.to_string(), d.amount.to_string()))
            .collect()
    }

    #[test]
    fn a_grant_effective_exactly_at_t_is_drawn() {
        let f = feature();
        let grants = [grant("g", "5")];
        let plan = plan_burn(&grants, &Reserved::default(), &request(&f, 1_000, "2", "0")).unwrap();
        assert_eq!(summary(&plan), [("g".into(), "2".into())]);
        let refused =
            plan_burn(&grants, &Reserved::default(), &request(&f, 999, "2", "0")).unwrap_err();
        assert_eq!(refused.shortfall, credits("2"));
    }

    #[test]
    fn a_grant_expiring_exactly_at_t_is_not_drawn() {
        let f = feature();
        let grants = [grant("g", "5").with_expiry(at(2_000))];
        assert!(plan_burn(&grants, &Reserved::default(), &request(&f, 1_999, "1", "0")).is_ok());
        let refused =
            plan_burn(&grants, &Reserved::default(), &request(&f, 2_000, "1", "0")).unwrap_err();
        assert_eq!(
            refused,
            Shortfall {
                cost: credits("1"),
                available: Credits::ZERO,
                shortfall: credits("1")
            }
        );
    }

    #[test]
    fn equal_priorities_burn_the_expiring_grant_before_the_one_without_expiry() {
        let f = feature();
        let grants = [
            grant("a-never", "5"),
            grant("b-soon", "5").with_expiry(at(9_000)),
        ];
        let plan = plan_burn(&grants, &Reserved::default(), &request(&f, 1_500, "7", "0")).unwrap();
        assert_eq!(
            summary(&plan),
            [
                ("b-soon".into(), "5".into()),
                ("a-never".into(), "2".into())
            ]
        );
        // Both without expiry: effective time, then id, decide.
        let grants = [grant("b", "5"), grant("a", "5")];
        let plan = plan_burn(&grants, &Reserved::default(), &request(&f, 1_500, "6", "0")).unwrap();
        assert_eq!(
            summary(&plan),
            [("a".into(), "5".into()), ("b".into(), "1".into())]
        );
    }

    #[test]
    fn a_debit_spans_three_grants() {
        let f = feature();
        let grants = [
            grant("purchase", "10"),
            grant("subscription", "3")
                .with_priority(10)
                .with_expiry(at(5_000)),
            grant("rollover", "2")
                .with_priority(5)
                .with_expiry(at(3_000)),
        ];
        let plan = plan_burn(
            &grants,
            &Reserved::default(),
            &request(&f, 2_000, "7.5", "0"),
        )
        .unwrap();
        assert_eq!(
            summary(&plan),
            [
                ("rollover".into(), "2".into()),
                ("subscription".into(), "3".into()),
                ("purchase".into(), "2.5".into())
            ]
        );
        assert_eq!(plan.overdraft, Credits::ZERO);
        assert_eq!(plan.total().unwrap(), credits("7.5"));
    }

    #[test]
    fn overdraft_down_to_the_limit_and_one_micro_credit_past_it() {
        let f = feature();
        let grants = [grant("g", "1")];
        let plan = plan_burn(&grants, &Reserved::default(), &request(&f, 1_000, "3", "2")).unwrap();
        assert_eq!(summary(&plan), [("g".into(), "1".into())]);
        assert_eq!(plan.overdraft, credits("2"));
        let refused = plan_burn(
            &grants,
            &Reserved::default(),
            &request(&f, 1_000, "3.000001", "2"),
        )
        .unwrap_err();
        assert_eq!(refused.shortfall, Credits::MICRO);
        assert_eq!(refused.available, credits("3"));
    }

    #[test]
    fn existing_debt_and_held_overdraft_shrink_the_room() {
        let f = feature();
        let mut reserved = Reserved::default();
        reserved
            .add(&BurnPlan {
                draws: vec![],
                overdraft: credits("1"),
            })
            .unwrap();
        let mut req = request(&f, 1_000, "1", "3");
        req.debt = credits("1");
        assert!(plan_burn(&[], &reserved, &req).is_ok());
        req.cost = credits("1.000001");
        assert_eq!(
            plan_burn(&[], &reserved, &req).unwrap_err().shortfall,
            Credits::MICRO
        );
    }

    #[test]
    fn out_of_scope_grants_and_held_credits_are_not_drawn() {
        let f = feature();
        let other = FeatureKey::new("email_lookup").unwrap();
        let grants = [
            grant("scoped", "5")
                .with_priority(0)
                .with_scope(Scope::Features([other].into())),
            grant("general", "5"),
        ];
        let mut reserved = Reserved::default();
        reserved
            .add(&BurnPlan {
                draws: vec![Draw {
                    grant_id: GrantId::new("general").unwrap(),
                    amount: credits("4"),
                }],
                overdraft: Credits::ZERO,
            })
            .unwrap();
        let plan = plan_burn(&grants, &reserved, &request(&f, 1_000, "1", "0")).unwrap();
        assert_eq!(summary(&plan), [("general".into(), "1".into())]);
        assert!(plan_burn(&grants, &reserved, &request(&f, 1_000, "1.5", "0")).is_err());
    }

    #[test]
    fn split_releases_overdraft_first() {
        let plan = BurnPlan {
            draws: vec![
                Draw {
                    grant_id: GrantId::new("a").unwrap(),
                    amount: credits("2"),
                },
                Draw {
                    grant_id: GrantId::new("b").unwrap(),
                    amount: credits("3"),
                },
            ],
            overdraft: credits("1"),
        };
        let (taken, rest) = plan.split_at(credits("3"));
        assert_eq!(
            summary(&taken),
            [("a".into(), "2".into()), ("b".into(), "1".into())]
        );
        assert_eq!(taken.overdraft, Credits::ZERO);
        assert_eq!(summary(&rest), [("b".into(), "2".into())]);
        assert_eq!(rest.overdraft, credits("1"));
    }
}
