//! Insights read from the ledger: usage broken down by feature, actor and region over time
//! buckets; a revenue report valued at each grant's cost basis; accounts ranked by burn.

use std::collections::BTreeMap;

use chrono::{Datelike, TimeZone, Timelike, Utc};
use rust_decimal::Decimal;
use tollgate_core::{AccountId, Credits, EntryKind, Grant, GrantId, Timestamp};
use tollgate_ledger::{DebitQuery, LedgerStore, PageRequest, PAGE_SIZE_MAX};
use tollgate_region::RegionStore;

use crate::authority::Authority;
use crate::error::{AuthorityError, Result};
use crate::settings::{BREAKDOWN_ROWS_MAX, REPORT_DEBITS_MAX, REPORT_ENTRIES_MAX};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bucket {
    Hour,
    Day,
    Month,
}

impl Bucket {
    /// The start of the bucket holding `at` (UTC).
    pub fn start(self, at: Timestamp) -> Timestamp {
        let t = at.to_datetime();
        let start = match self {
            Bucket::Hour => Utc.with_ymd_and_hms(t.year(), t.month(), t.day(), t.hour(), 0, 0),
            Bucket::Day => Utc.with_ymd_and_hms(t.year(), t.month(), t.day(), 0, 0, 0),
            Bucket::Month => Utc.with_ymd_and_hms(t.year(), t.month(), 1, 0, 0, 0),
        };
        start
            .single()
            .and_then(|s| Timestamp::from_datetime(s).ok())
            .unwrap_or(at)
    }
}

/// What to group usage by, besides the bucket.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GroupBy {
    pub feature: bool,
    pub actor: bool,
    pub region: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct UsageKey {
    pub bucket_start: Option<Timestamp>,
    pub feature: String,
    pub actor: String,
    pub region: String,
}

/// Credits consumed (net of refunds) and the number of debits, per key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UsageRow {
    pub key: UsageKey,
    pub credits: Credits,
    pub debits: u64,
}

/// One currency's line of the revenue report (credits of grants without a cost basis are on
/// the line with no currency, valued at zero).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RevenueLine {
    pub currency: String,
    pub credits_sold: Credits,
    pub money_sold: Decimal,
    pub credits_consumed: Credits,
    pub money_consumed: Decimal,
    pub credits_expired: Credits,
    pub money_breakage: Decimal,
    pub credits_refunded: Credits,
    pub money_refunded: Decimal,
    /// Voided credits (purchases refunded, operators' voids) and the money they stood for.
    pub credits_voided: Credits,
    pub money_voided: Decimal,
}

/// An account's burn over a window: the total, and the growth from its first half to its second.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BurnRank {
    pub account: AccountId,
    pub burned: Credits,
    pub first_half: Credits,
    pub second_half: Credits,
    /// `(second − first) / first`, in percent; `None` when the first half burned nothing.
    pub growth_percent: Option<Decimal>,
}

fn add(total: &mut Credits, amount: Credits) -> Result<()> {
    *total = total.checked_add(amount).map_err(AuthorityError::corrupt)?;
    Ok(())
}

impl<L: LedgerStore + ?Sized, R: RegionStore> Authority<L, R> {
    /// Every debit of the query, up to [`REPORT_DEBITS_MAX`].
    async fn each_debit(
        &self,
        query: &DebitQuery,
        mut visit: impl FnMut(&tollgate_ledger::DebitRow) -> Result<()>,
    ) -> Result<()> {
        let mut page = PageRequest {
            size: PAGE_SIZE_MAX,
            token: None,
        };
        let mut read = 0_usize;
        loop {
            let found = self.ledger.debits(query, page.clone()).await?;
            for debit in &found.items {
                visit(debit)?;
            }
            read += found.items.len();
            match found.next_token {
                Some(token) if read < REPORT_DEBITS_MAX => page.token = Some(token),
                Some(_) => {
                    return Err(AuthorityError::invalid(
                        "until",
                        format!("more than {REPORT_DEBITS_MAX} debits; ask for a shorter window"),
                    ))
                }
                None => return Ok(()),
            }
        }
    }

    pub async fn usage_breakdown(
        &self,
        query: &DebitQuery,
        bucket: Option<Bucket>,
        group_by: GroupBy,
    ) -> Result<Vec<UsageRow>> {
        let mut rows: BTreeMap<UsageKey, (Credits, u64)> = BTreeMap::new();
        self.each_debit(query, |debit| {
            let key = UsageKey {
                bucket_start: bucket.map(|b| b.start(debit.at)),
                feature: if group_by.feature {
                    debit.feature.to_string()
                } else {
                    String::new()
                },
                actor: match (&debit.actor, group_by.actor) {
                    (Some(actor), true) => actor.to_string(),
                    _ => String::new(),
                },
                region: match (&debit.region, group_by.region) {
                    (Some(region), true) => region.to_string(),
                    _ => String::new(),
                },
            };
            if !rows.contains_key(&key) && rows.len() >= BREAKDOWN_ROWS_MAX {
                return Err(AuthorityError::invalid(
                    "bucket",
                    format!("more than {BREAKDOWN_ROWS_MAX} rows; use larger buckets"),
                ));
            }
            let row = rows.entry(key).or_insert((Credits::ZERO, 0));
            add(
                &mut row.0,
                debit.amount.saturating_sub_floor_zero(debit.refunded),
            )?;
            row.1 += 1;
            Ok(())
        })
        .await?;
        Ok(rows
            .into_iter()
            .map(|(key, (credits, debits))| UsageRow {
                key,
                credits,
                debits,
            })
            .collect())
    }

    /// Credits sold (grants issued with a cost basis, and every other issued grant on the line
    /// without currency), consumed (debits), expired (breakage), refunded to balances and
    /// voided (purchases refunded: money owed back) in the window, each valued at the cost per
    /// credit of the grant it touched.
    pub async fn revenue_report(&self, query: &DebitQuery) -> Result<Vec<RevenueLine>> {
        let mut lines: BTreeMap<String, RevenueLine> = BTreeMap::new();
        let mut grants: BTreeMap<(AccountId, GrantId), Grant> = BTreeMap::new();
        let mut page = PageRequest {
            size: PAGE_SIZE_MAX,
            token: None,
        };
        let mut read = 0_usize;
        loop {
            let found = self.ledger.entries_between(query, page.clone()).await?;
            for entry in &found.items {
                let Some(grant_id) = &entry.grant_id else {
                    continue;
                };
                let key = (entry.account.clone(), grant_id.clone());
                if !grants.contains_key(&key) {
                    for record in self.all_grants(&entry.account).await? {
                        grants.insert((entry.account.clone(), record.id.clone()), record);
                    }
                }
                let Some(grant) = grants.get(&key) else {
                    continue;
                };
                record_revenue(&mut lines, entry.kind, entry.amount, grant)?;
            }
            read += found.items.len();
            match found.next_token {
                Some(token) if read < REPORT_ENTRIES_MAX => page.token = Some(token),
                Some(_) => {
                    return Err(AuthorityError::invalid(
                        "until",
                        format!("more than {REPORT_ENTRIES_MAX} entries; ask for a shorter window"),
                    ))
                }
                None => return Ok(lines.into_values().collect()),
            }
        }
    }

    async fn all_grants(&self, account: &AccountId) -> Result<Vec<Grant>> {
        let mut grants = Vec::new();
        let mut page = PageRequest {
            size: PAGE_SIZE_MAX,
            token: None,
        };
        loop {
            let found = self.ledger.grants(account, false, page.clone()).await?;
            grants.extend(found.items.into_iter().map(|r| r.grant));
            match found.next_token {
                Some(token) => page.token = Some(token),
                None => return Ok(grants),
            }
        }
    }

    /// Accounts ranked by what they burned in the window, and by how that grew from its
    /// first half to its second. Returns (by burn, by growth), each at most `limit` long.
    pub async fn burn_ranking(
        &self,
        from: Timestamp,
        until: Timestamp,
        limit: usize,
    ) -> Result<(Vec<BurnRank>, Vec<BurnRank>)> {
        let middle = from.millis() + (until.millis() - from.millis()) / 2;
        let mut halves: BTreeMap<AccountId, (Credits, Credits)> = BTreeMap::new();
        let query = DebitQuery {
            account: None,
            from,
            until,
        };
        self.each_debit(&query, |debit| {
            let half = halves.entry(debit.account.clone()).or_default();
            let net = debit.amount.saturating_sub_floor_zero(debit.refunded);
            if debit.at.millis() < middle {
                add(&mut half.0, net)
            } else {
                add(&mut half.1, net)
            }
        })
        .await?;
        let ranks: Vec<BurnRank> = halves
            .into_iter()
            .map(|(account, (first, second))| BurnRank {
                account,
                burned: Credits::from_micros(first.micros().saturating_add(second.micros())),
                first_half: first,
                second_half: second,
                growth_percent: (first.is_positive()).then(|| {
                    (second.to_decimal() - first.to_decimal()) * Decimal::ONE_HUNDRED
                        / first.to_decimal()
                }),
            })
            .collect();
        let mut by_burn = ranks.clone();
        by_burn.sort_by(|a, b| b.burned.cmp(&a.burned).then(a.account.cmp(&b.account)));
        by_burn.truncate(limit);
        let mut by_growth: Vec<BurnRank> = ranks
            .into_iter()
            .filter(|r| r.growth_percent.is_some())
            .collect();
        by_growth.sort_by(|a, b| {
            b.growth_percent
                .cmp(&a.growth_percent)
                .then(a.account.cmp(&b.account))
        });
        by_growth.truncate(limit);
        Ok((by_burn, by_growth))
    }
}

/// Adds one entry to its currency's line. Grant entries count as sold (purchases and other
/// issued grants, not rollovers, refunds or adjustments, which move credits already counted).
fn record_revenue(
    lines: &mut BTreeMap<String, RevenueLine>,
    kind: EntryKind,
    amount: Credits,
    grant: &Grant,
) -> Result<()> {
    let (currency, per_credit) = match &grant.cost_basis {
        Some(money) if grant.amount.is_positive() => (
            money.currency.as_str().to_owned(),
            money.amount / grant.amount.to_decimal(),
        ),
        _ => (String::new(), Decimal::ZERO),
    };
    let line = lines
        .entry(currency.clone())
        .or_insert_with(|| RevenueLine {
            currency,
            ..RevenueLine::default()
        });
    let value = (amount.to_decimal() * per_credit).round_dp(6);
    match kind {
        EntryKind::Grant => {
            add(&mut line.credits_sold, amount)?;
            line.money_sold += value;
        }
        EntryKind::Debit => {
            add(&mut line.credits_consumed, amount)?;
            line.money_consumed += value;
        }
        EntryKind::Expire => {
            add(&mut line.credits_expired, amount)?;
            line.money_breakage += value;
        }
        EntryKind::Refund => {
            add(&mut line.credits_refunded, amount)?;
            line.money_refunded += value;
        }
        EntryKind::Void => {
            add(&mut line.credits_voided, amount)?;
            line.money_voided += value;
        }
        _ => {}
    }
    Ok(())
}
