//! The account's balance: the figure an edge's `GetBalance` gives (`balance.balance`,
//! docs/answer.md) — the account's grants effective and unexpired now, less the credits set
//! aside by holds in flight in every region, less debt — told from the ledger and the regions'
//! holds. Admin `GetBalance` (and through it the operator CLI's `tollgate balance`), the console
//! and the widget all tell it here. What one region holds of it is a slice handed out so edges
//! decide without leaving their region; it is never the balance. Grants not effective yet and
//! grants past their expiry that the expiry run has not closed yet are named, never counted.

use std::collections::BTreeMap;

use tollgate_core::{AccountId, Credits, Grant, GrantId, GrantState, RegionId, Scope, Timestamp};
use tollgate_ledger::{AccountSnapshot, LedgerError, LedgerStore};
use tollgate_region::AccountView;

use crate::lifecycle::Lifecycle;

/// Where a balance too far below zero to tell stops (never reached by real figures: every
/// amount is bounded far below `i64::MAX` micro-credits).
const BALANCE_FLOOR: Credits = Credits::from_micros(-i64::MAX);

/// An open grant left out of the balance, and the instant that explains why: when it starts,
/// or when it expired.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GrantAside {
    pub grant: GrantId,
    pub remaining: Credits,
    pub at: Timestamp,
}

/// The account's balance at one instant, with the terms it is made of.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AccountBalance {
    /// `effective − held − debt`: what replies, `GetBalance`, the CLI and gateways say.
    pub balance: Credits,
    /// Remainders of the open grants effective and unexpired now.
    pub effective: Credits,
    /// Credits set aside by holds in flight, in every region read.
    pub held: Credits,
    pub debt: Credits,
    /// Open grants with credits that are not effective yet, soonest start first.
    pub upcoming: Vec<GrantAside>,
    /// Open grants with credits past their expiry, waiting for the expiry run (expiry is final
    /// only once every region has reconciled past it), soonest expiry first.
    pub lapsed: Vec<GrantAside>,
    /// Regions whose holds could not be read, with why: the balance counts none of theirs.
    pub holds_unread: Vec<String>,
    /// The effective credits per scope ("all features", or the features joined by ", ").
    pub per_scope: BTreeMap<String, Credits>,
}

/// The account's balance at `now` from its grants (open, with credits), its debt and what its
/// holds in flight set aside. Pure: the one place the figure is told.
pub fn tell(grants: &[Grant], debt: Credits, held: Credits, now: Timestamp) -> AccountBalance {
    let mut effective = Credits::ZERO;
    let mut upcoming = Vec::new();
    let mut lapsed = Vec::new();
    let mut per_scope: BTreeMap<String, Credits> = BTreeMap::new();
    for grant in grants
        .iter()
        .filter(|g| g.state == GrantState::Open && g.remaining.is_positive())
    {
        let aside = |at| GrantAside {
            grant: grant.id.clone(),
            remaining: grant.remaining,
            at,
        };
        match grant.expires_at {
            _ if now < grant.effective_at => upcoming.push(aside(grant.effective_at)),
            Some(expires_at) if expires_at <= now => lapsed.push(aside(expires_at)),
            _ => {
                effective = effective
                    .checked_add(grant.remaining)
                    .unwrap_or(Credits::MAX);
                let scope = per_scope.entry(scope_text(&grant.scope)).or_default();
                *scope = scope.checked_add(grant.remaining).unwrap_or(Credits::MAX);
            }
        }
    }
    upcoming.sort_by(|a, b| (a.at, &a.grant).cmp(&(b.at, &b.grant)));
    lapsed.sort_by(|a, b| (a.at, &a.grant).cmp(&(b.at, &b.grant)));
    debug_assert!(!held.is_negative() && !debt.is_negative());
    let balance = effective
        .checked_sub(held)
        .and_then(|credits| credits.checked_sub(debt))
        .unwrap_or(BALANCE_FLOOR);
    AccountBalance {
        balance,
        effective,
        held,
        debt,
        upcoming,
        lapsed,
        holds_unread: Vec::new(),
        per_scope,
    }
}

/// A grant's scope as the console writes it.
fn scope_text(scope: &Scope) -> String {
    match scope {
        Scope::All => "all features".into(),
        Scope::Features(features) => features
            .iter()
            .map(|f| f.as_str())
            .collect::<Vec<_>>()
            .join(", "),
    }
}

impl AccountBalance {
    /// The same balance less what holds in flight set aside (read after the grants).
    pub fn less_holds(mut self, held: Credits, unread: Vec<String>) -> Self {
        self.held = self.held.checked_add(held).unwrap_or(Credits::MAX);
        self.balance = self.balance.checked_sub(held).unwrap_or(BALANCE_FLOOR);
        self.holds_unread.extend(unread);
        self
    }

    /// Credits of the grants not effective yet.
    pub fn upcoming_total(&self) -> Credits {
        sum(&self.upcoming)
    }

    /// Credits of the grants past expiry, waiting for the expiry run.
    pub fn lapsed_total(&self) -> Credits {
        sum(&self.lapsed)
    }
}

fn sum(grants: &[GrantAside]) -> Credits {
    Credits::checked_sum(grants.iter().map(|g| g.remaining)).unwrap_or(Credits::MAX)
}

/// What the regions' holds in flight set aside for the account, and the regions that could
/// not be read (with why).
pub fn held_in(views: &[(RegionId, Result<AccountView, String>)]) -> (Credits, Vec<String>) {
    let mut held = Credits::ZERO;
    let mut unread = Vec::new();
    for (region, view) in views {
        match view {
            Ok(view) => held = held.checked_add(view.held).unwrap_or(Credits::MAX),
            Err(why) => unread.push(format!("{region}: {why}")),
        }
    }
    (held, unread)
}

/// What each region `regions` reaches holds for the account now (none without an authority).
pub async fn region_views(
    regions: Option<&dyn Lifecycle>,
    account: &AccountId,
) -> Vec<(RegionId, Result<AccountView, String>)> {
    match regions {
        Some(regions) => regions.region_views(account.clone()).await,
        None => Vec::new(),
    }
}

/// The account's balance at `now` from the ledger alone (its open grants and `debt`), before
/// holds.
pub async fn from_ledger(
    ledger: &dyn LedgerStore,
    account: &AccountId,
    debt: Credits,
    now: Timestamp,
) -> Result<AccountBalance, LedgerError> {
    let grants = ledger
        .grants_with_credits(account, tollgate_ledger::OPEN_GRANTS_MAX)
        .await?;
    Ok(tell(&grants, debt, Credits::ZERO, now))
}

/// The account's ledger snapshot and its balance at `now`: the ledger's grants and debt, less
/// the holds in flight of the regions `regions` reaches (read after the grants). A region that
/// cannot be read is named in `holds_unread`; it never fails the call.
pub async fn read(
    ledger: &dyn LedgerStore,
    regions: Option<&dyn Lifecycle>,
    account: &AccountId,
    now: Timestamp,
) -> Result<(AccountSnapshot, AccountBalance), LedgerError> {
    let snapshot = ledger.account(account).await?;
    let balance = from_ledger(ledger, account, snapshot.debt, now).await?;
    let (held, unread) = held_in(&region_views(regions, account).await);
    Ok((snapshot, balance.less_holds(held, unread)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(seconds: i64) -> Timestamp {
        Timestamp::from_millis(seconds * 1_000).unwrap()
    }

    fn credits(whole: i64) -> Credits {
        Credits::from_whole(whole).unwrap()
    }

    fn grant(id: &str, amount: i64, effective: i64, expires: Option<i64>) -> Grant {
        let grant = Grant::new(
            GrantId::new(id).unwrap(),
            credits(amount),
            tollgate_core::GrantSource::Promo,
            at(effective),
        );
        match expires {
            Some(expires) => grant.with_expiry(at(expires)),
            None => grant,
        }
    }

    #[test]
    fn only_grants_effective_and_unexpired_now_count_less_holds_and_debt() {
        let grants = [
            grant("now", 10, 0, None),
            grant("soon", 7, 0, Some(2_000)),
            grant("tomorrow", 50, 1_000 + 86_400, None),
            grant("lapsed", 30, 0, Some(900)),
            grant("edge-start", 1, 1_000, None),
            grant("edge-expiry", 2, 0, Some(1_000)),
        ];
        let told = tell(&grants, credits(1), credits(3), at(1_000));
        // Effective exactly now counts; expiring exactly now does not (effective <= t < expires).
        assert_eq!(told.effective, credits(10 + 7 + 1));
        assert_eq!(told.balance, credits(18 - 3 - 1));
        assert_eq!(
            told.upcoming,
            [GrantAside {
                grant: GrantId::new("tomorrow").unwrap(),
                remaining: credits(50),
                at: at(1_000 + 86_400),
            }]
        );
        let lapsed: Vec<&str> = told.lapsed.iter().map(|g| g.grant.as_str()).collect();
        assert_eq!(lapsed, ["lapsed", "edge-expiry"]);
        assert_eq!(told.lapsed_total(), credits(32));
        assert_eq!(told.upcoming_total(), credits(50));
    }

    #[test]
    fn closed_grants_count_nothing_and_holds_lower_the_balance() {
        let mut voided = grant("voided", 5, 0, None);
        voided.state = GrantState::Voided;
        let told = tell(
            &[voided, grant("open", 4, 0, None)],
            Credits::ZERO,
            Credits::ZERO,
            at(10),
        );
        assert_eq!(told.balance, credits(4));
        let told = told.less_holds(credits(1), vec!["far: down".into()]);
        assert_eq!(told.balance, credits(3));
        assert_eq!(told.held, credits(1));
        assert_eq!(told.holds_unread, ["far: down"]);
    }
}
