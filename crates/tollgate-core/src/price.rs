//! Price resolution: which rate applies to this account, feature, region and moment, and why.
//!
//! Order: account contract > plan + region > plan > region > default. Versions take effect at
//! their `effective_from`; a version may apply only to accounts created from then on
//! (grandfathering), in which case older accounts keep resolving against the version before it.

use std::collections::BTreeMap;

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::credits::Credits;
use crate::error::AmountError;
use crate::ids::{AccountId, FeatureKey, PlanId, RegionId};
use crate::rate::{cost, Quantity, Rate};
use crate::time::Timestamp;

/// Which rule priced a request. Recorded on every debit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PriceRule {
    AccountContract,
    PlanRegion,
    Plan,
    Region,
    Default,
}

impl PriceRule {
    pub const ALL: [PriceRule; 5] = [
        PriceRule::AccountContract,
        PriceRule::PlanRegion,
        PriceRule::Plan,
        PriceRule::Region,
        PriceRule::Default,
    ];

    pub fn parse(text: &str) -> Option<PriceRule> {
        PriceRule::ALL
            .into_iter()
            .find(|rule| rule.as_str() == text)
    }

    pub const fn as_str(self) -> &'static str {
        match self {
            PriceRule::AccountContract => "account_contract",
            PriceRule::PlanRegion => "plan_region",
            PriceRule::Plan => "plan",
            PriceRule::Region => "region",
            PriceRule::Default => "default",
        }
    }
}

/// Who a version applies to.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Audience {
    /// Every account, from `effective_from` on.
    #[default]
    AllAccounts,
    /// Only accounts created at or after `effective_from`; older ones keep the previous version.
    NewAccounts,
}

pub type Rates = BTreeMap<FeatureKey, Rate>;

/// One immutable version of the price book.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PriceBookVersion {
    pub version: u64,
    pub effective_from: Timestamp,
    pub audience: Audience,
    pub default: Rates,
    pub regions: BTreeMap<RegionId, Rates>,
    pub plans: BTreeMap<PlanId, Rates>,
    pub plan_regions: BTreeMap<(PlanId, RegionId), Rates>,
}

/// A per-account agreement: custom rates, a locked version, a discount, for a period.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Contract {
    pub account_id: AccountId,
    pub rates: Rates,
    /// Resolve everything the contract does not price against this version, whatever is newer.
    pub locked_version: Option<u64>,
    /// Multiplies every rate the contract does not set itself (`0.8` is 20 % off).
    pub discount_multiplier: Option<Decimal>,
    pub effective_from: Timestamp,
    pub effective_until: Option<Timestamp>,
    /// Grants issued to the account while the contract is in force (one-off grants and
    /// purchases, not recurring periods) never expire.
    #[serde(default)]
    pub no_expiry: bool,
}

impl Contract {
    pub fn is_active_at(&self, at: Timestamp) -> bool {
        self.effective_from <= at && self.effective_until.is_none_or(|until| at < until)
    }
}

/// Everything resolution needs to know about the request.
#[derive(Clone, Copy, Debug)]
pub struct PriceQuery<'a> {
    pub account_created_at: Timestamp,
    pub plan: Option<&'a PlanId>,
    pub region: &'a RegionId,
    pub feature: &'a FeatureKey,
    pub at: Timestamp,
    pub contract: Option<&'a Contract>,
}

/// A resolved rate and where it came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResolvedPrice {
    pub rate: Rate,
    pub version: u64,
    pub rule: PriceRule,
}

impl ResolvedPrice {
    pub fn cost(&self, quantity: Quantity) -> Result<Credits, AmountError> {
        cost(self.rate, quantity)
    }
}

#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum PriceError {
    #[error("no price book version is in effect at {0}")]
    NoVersion(Timestamp),
    #[error("locked price book version {0} does not exist")]
    UnknownLockedVersion(u64),
    #[error("feature {0} has no price")]
    UnknownFeature(FeatureKey),
    #[error("discounted rate: {0}")]
    Discount(AmountError),
}

/// All versions of the price book, oldest first.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PriceBook {
    versions: Vec<PriceBookVersion>,
}

impl PriceBook {
    /// Keeps versions ordered by `effective_from`, then version number.
    pub fn new(mut versions: Vec<PriceBookVersion>) -> Self {
        versions.sort_by_key(|v| (v.effective_from, v.version));
        PriceBook { versions }
    }

    pub fn versions(&self) -> &[PriceBookVersion] {
        &self.versions
    }

    /// The version an account sees at `at`: the newest in effect whose audience includes it.
    pub fn version_for(
        &self,
        account_created_at: Timestamp,
        at: Timestamp,
    ) -> Option<&PriceBookVersion> {
        self.versions.iter().rev().find(|v| {
            v.effective_from <= at
                && match v.audience {
                    Audience::AllAccounts => true,
                    Audience::NewAccounts => account_created_at >= v.effective_from,
                }
        })
    }

    pub fn resolve(&self, query: &PriceQuery<'_>) -> Result<ResolvedPrice, PriceError> {
        let contract = query.contract.filter(|c| c.is_active_at(query.at));
        let version = match contract.and_then(|c| c.locked_version) {
            Some(locked) => self
                .versions
                .iter()
                .find(|v| v.version == locked)
                .ok_or(PriceError::UnknownLockedVersion(locked))?,
            None => self
                .version_for(query.account_created_at, query.at)
                .ok_or(PriceError::NoVersion(query.at))?,
        };
        if let Some(rate) = contract.and_then(|c| c.rates.get(query.feature)) {
            return Ok(ResolvedPrice {
                rate: *rate,
                version: version.version,
                rule: PriceRule::AccountContract,
            });
        }
        let (rate, rule) = resolve_in_version(version, query)
            .ok_or_else(|| PriceError::UnknownFeature(query.feature.clone()))?;
        match contract.and_then(|c| c.discount_multiplier) {
            Some(multiplier) => Ok(ResolvedPrice {
                rate: rate.scaled(multiplier).map_err(PriceError::Discount)?,
                version: version.version,
                rule: PriceRule::AccountContract,
            }),
            None => Ok(ResolvedPrice {
                rate,
                version: version.version,
                rule,
            }),
        }
    }
}

fn resolve_in_version(
    version: &PriceBookVersion,
    query: &PriceQuery<'_>,
) -> Option<(Rate, PriceRule)> {
    let feature = query.feature;
    let plan_region = query
        .plan
        .and_then(|plan| {
            version
                .plan_regions
                .get(&(plan.clone(), query.region.clone()))
        })
        .and_then(|rates| rates.get(feature))
        .map(|rate| (*rate, PriceRule::PlanRegion));
    let plan = || {
        query
            .plan
            .and_then(|plan| version.plans.get(plan))
            .and_then(|rates| rates.get(feature))
            .map(|rate| (*rate, PriceRule::Plan))
    };
    let region = || {
        version
            .regions
            .get(query.region)
            .and_then(|rates| rates.get(feature))
            .map(|rate| (*rate, PriceRule::Region))
    };
    let default = || {
        version
            .default
            .get(feature)
            .map(|rate| (*rate, PriceRule::Default))
    };
    plan_region.or_else(plan).or_else(region).or_else(default)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(millis: i64) -> Timestamp {
        Timestamp::from_millis(millis).unwrap()
    }

    fn rates(pairs: &[(&str, &str)]) -> Rates {
        pairs
            .iter()
            .map(|(f, r)| (FeatureKey::new(*f).unwrap(), Rate::parse(r).unwrap()))
            .collect()
    }

    fn book() -> PriceBook {
        let pro = PlanId::new("pro").unwrap();
        let eu = RegionId::new("eu").unwrap();
        let v1 = PriceBookVersion {
            version: 1,
            effective_from: at(0),
            default: rates(&[("gen", "1"), ("lookup", "0.5")]),
            regions: [(eu.clone(), rates(&[("gen", "1.2")]))].into(),
            plans: [(pro.clone(), rates(&[("gen", "0.8")]))].into(),
            plan_regions: [((pro, eu), rates(&[("gen", "0.9")]))].into(),
            ..PriceBookVersion::default()
        };
        let v2 = PriceBookVersion {
            version: 2,
            effective_from: at(1_000),
            default: rates(&[("gen", "2"), ("lookup", "0.5")]),
            ..PriceBookVersion::default()
        };
        let v3 = PriceBookVersion {
            version: 3,
            effective_from: at(2_000),
            audience: Audience::NewAccounts,
            default: rates(&[("gen", "3"), ("lookup", "0.5")]),
            ..PriceBookVersion::default()
        };
        PriceBook::new(vec![v3, v1, v2])
    }

    fn query<'a>(
        feature: &'a FeatureKey,
        region: &'a RegionId,
        plan: Option<&'a PlanId>,
        at_ms: i64,
    ) -> PriceQuery<'a> {
        PriceQuery {
            account_created_at: at(0),
            plan,
            region,
            feature,
            at: at(at_ms),
            contract: None,
        }
    }

    #[test]
    fn resolution_order() {
        let book = book();
        let gen = FeatureKey::new("gen").unwrap();
        let eu = RegionId::new("eu").unwrap();
        let us = RegionId::new("us").unwrap();
        let pro = PlanId::new("pro").unwrap();
        let free = PlanId::new("free").unwrap();
        let rule = |q: PriceQuery<'_>| {
            let p = book.resolve(&q).unwrap();
            (p.rate.to_string(), p.rule, p.version)
        };
        assert_eq!(
            rule(query(&gen, &eu, Some(&pro), 10)),
            ("0.9".into(), PriceRule::PlanRegion, 1)
        );
        assert_eq!(
            rule(query(&gen, &us, Some(&pro), 10)),
            ("0.8".into(), PriceRule::Plan, 1)
        );
        assert_eq!(
            rule(query(&gen, &eu, Some(&free), 10)),
            ("1.2".into(), PriceRule::Region, 1)
        );
        assert_eq!(
            rule(query(&gen, &us, None, 10)),
            ("1".into(), PriceRule::Default, 1)
        );

        let contract = Contract {
            account_id: AccountId::new("acme").unwrap(),
            rates: rates(&[("gen", "0.1")]),
            locked_version: None,
            discount_multiplier: None,
            effective_from: at(0),
            effective_until: Some(at(500)),
            no_expiry: false,
        };
        let mut q = query(&gen, &eu, Some(&pro), 10);
        q.contract = Some(&contract);
        assert_eq!(rule(q), ("0.1".into(), PriceRule::AccountContract, 1));
        q.at = at(500);
        assert_eq!(
            rule(q),
            ("0.9".into(), PriceRule::PlanRegion, 1),
            "the contract ended"
        );
    }

    #[test]
    fn versions_take_effect_at_effective_from_and_grandfather() {
        let book = book();
        let gen = FeatureKey::new("gen").unwrap();
        let us = RegionId::new("us").unwrap();
        assert_eq!(
            book.resolve(&query(&gen, &us, None, 999)).unwrap().version,
            1
        );
        assert_eq!(
            book.resolve(&query(&gen, &us, None, 1_000))
                .unwrap()
                .version,
            2
        );
        // v3 is for new accounts only: an account created at 0 stays on v2.
        assert_eq!(
            book.resolve(&query(&gen, &us, None, 5_000))
                .unwrap()
                .version,
            2
        );
        let mut newcomer = query(&gen, &us, None, 5_000);
        newcomer.account_created_at = at(2_000);
        assert_eq!(book.resolve(&newcomer).unwrap().version, 3);
    }

    #[test]
    fn locked_version_and_discount() {
        let book = book();
        let gen = FeatureKey::new("gen").unwrap();
        let us = RegionId::new("us").unwrap();
        let contract = Contract {
            account_id: AccountId::new("acme").unwrap(),
            rates: Rates::new(),
            locked_version: Some(1),
            discount_multiplier: Some(Decimal::new(5, 1)),
            effective_from: at(0),
            effective_until: None,
            no_expiry: false,
        };
        let mut q = query(&gen, &us, None, 5_000);
        q.contract = Some(&contract);
        let price = book.resolve(&q).unwrap();
        assert_eq!(
            (price.rate.to_string(), price.version, price.rule),
            ("0.5".into(), 1, PriceRule::AccountContract)
        );
    }

    #[test]
    fn unknown_feature_and_missing_version() {
        let book = book();
        let nope = FeatureKey::new("nope").unwrap();
        let us = RegionId::new("us").unwrap();
        assert_eq!(
            book.resolve(&query(&nope, &us, None, 10)),
            Err(PriceError::UnknownFeature(nope.clone()))
        );
        let empty = PriceBook::default();
        assert_eq!(
            empty.resolve(&query(&nope, &us, None, 10)),
            Err(PriceError::NoVersion(at(10)))
        );
    }
}
