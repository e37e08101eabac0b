//! The differential oracle: every spending decision an edge gives is compared with what the
//! reference model ([`crate::shadow`]) says the account's own ledger would have answered at the
//! same event time. A refusal for want of credits that the model could have paid is a **false
//! refusal**; each one is counted by decision kind and cause, and with one region it breaks
//! the run unless a fault explains it (see [`judge`]).

use std::collections::BTreeMap;
use std::fmt;

use tollgate_core::Credits;

/// Which decision an edge gave.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum DecisionKind {
    DebitStrict,
    DebitCached,
    Authorize,
}

impl DecisionKind {
    pub fn name(self) -> &'static str {
        match self {
            DecisionKind::DebitStrict => "debit_strict",
            DecisionKind::DebitCached => "debit_cached",
            DecisionKind::Authorize => "authorize",
        }
    }
}

/// Why an edge refused what the account could pay, as far as the simulation can tell. When
/// several hold, the first in this order is named.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Cause {
    /// The authority could not be reached during the request (the edges' link was cut by a
    /// fault, or the allocation it asked for failed on an injected install fault).
    AuthorityDown,
    /// A client retry of a spend already acknowledged on another edge and not flushed yet:
    /// the question was answered before, so this is an idempotency matter, not the balance's.
    RetryOfAcknowledged,
    /// The regional store was down (a Redis restart): a cached edge decided from its lease.
    RegionDown,
    /// Credits out on the lease of an edge that crashed, out of reach until the lease expires.
    CrashedEdgeLease,
    /// Credits out on the lease of an edge partitioned from its region, out of reach until the
    /// partition heals or the lease expires (the same bound as a crashed edge's lease).
    PartitionedEdgeLease,
    /// Debt a spend ran up in the region before a grant was issued, the spend not reconciled
    /// yet: in event order the grant settled that debt, but the region's overdraft room stays
    /// used until the authority reconciles the spend and settles it (docs/answer.md).
    DebtUnreconciled,
    /// None of the above: the region (with what the authority brought) held less than the
    /// account had.
    RegionShort,
}

impl Cause {
    pub fn name(self) -> &'static str {
        match self {
            Cause::AuthorityDown => "authority_down",
            Cause::RetryOfAcknowledged => "retry_of_acknowledged",
            Cause::RegionDown => "region_down",
            Cause::CrashedEdgeLease => "crashed_edge_lease",
            Cause::PartitionedEdgeLease => "partitioned_edge_lease",
            Cause::DebtUnreconciled => "debt_unreconciled",
            Cause::RegionShort => "region_short",
        }
    }
}

/// Why a balance an edge reported after a debit (`Debited::balance_after`) differs from the
/// model's. A difference is taken apart into these, in this order; the explained ones are the
/// bounds docs/answer.md states ("The balance a caller sees").
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum BalanceClass {
    /// The region could not be read to tell (it was down): not checked.
    RegionDown,
    /// A strict reply: credits on other edges' leases, which the script's result does not carry.
    OtherEdgesLeases,
    /// A cached reply: other edges' cached decisions not flushed yet.
    OtherEdgesUnflushed,
    /// A cached reply: the region changed (other edges' or strict decisions, holds, installs,
    /// expiries) since this edge last read it.
    RegionAsLastRead,
    /// A strict reply differs from its own formula (the script's pool and room, this edge's
    /// lease, the account's summary as published now): the edge's summary was older.
    StaleSummary,
    /// The debt as the region sees it (the ledger's debt basis less the region's room) is not
    /// the model's: usage not reconciled yet, or debt the model settled from a later grant
    /// that the ledger leaves standing (docs/simulation.md, "What is left").
    DebtBasis,
    /// A client retry decided again from a lease while the first decision was charged or
    /// pending elsewhere: it settles as a duplicate (credited back to the lease), but until it
    /// is flushed the region counts it spent.
    RetryPending,
    /// Credits the authority handed to the region whose install was lost on the way: counted
    /// neither outside the region nor in it until the next recovery replays the install.
    InstallInFlight,
    /// A grant issued after the account's summary was last published in the region (the
    /// publish failed with the region down) and not installed there: the region does not know
    /// of it until the next publish or allocation.
    Unpublished,
    /// With several regions, what is left is no more than the other regions hold: their
    /// spends not reconciled yet and their holds are not seen here.
    OtherRegions,
    /// None of the above.
    Unexplained,
}

impl BalanceClass {
    pub fn name(self) -> &'static str {
        match self {
            BalanceClass::RegionDown => "region_down",
            BalanceClass::OtherEdgesLeases => "other_edges_leases",
            BalanceClass::OtherEdgesUnflushed => "other_edges_unflushed",
            BalanceClass::RegionAsLastRead => "region_as_last_read",
            BalanceClass::StaleSummary => "stale_summary",
            BalanceClass::DebtBasis => "debt_basis",
            BalanceClass::RetryPending => "retry_pending",
            BalanceClass::InstallInFlight => "install_in_flight",
            BalanceClass::Unpublished => "unpublished_grant",
            BalanceClass::OtherRegions => "other_regions",
            BalanceClass::Unexplained => "unexplained",
        }
    }

    /// Whether the class is a stated bound of the figure rather than a fault of it.
    pub fn explained(self) -> bool {
        !matches!(self, BalanceClass::Unexplained)
    }
}

/// An edge's refusal for want of credits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Answer {
    /// `Refused::Insufficient`: the account cannot pay.
    Insufficient { available: Credits },
    /// `Refused::AuthorityUnreachable`: the region could not pay and the authority, which may
    /// hold the rest, could not be reached.
    AuthorityUnreachable { available: Credits },
}

impl fmt::Display for Answer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Answer::Insufficient { available } => write!(f, "insufficient, available {available}"),
            Answer::AuthorityUnreachable { available } => {
                write!(f, "authority unreachable, available {available}")
            }
        }
    }
}

/// What was true while an edge refused, for the cause.
#[derive(Clone, Copy, Debug, Default)]
pub struct Circumstances {
    pub authority_failed: bool,
    pub retry_of_acknowledged: bool,
    pub region_down: bool,
    pub crashed_edge_lease: bool,
    pub partitioned_edge_lease: bool,
    pub debt_unreconciled: bool,
}

impl Circumstances {
    pub fn cause(self) -> Cause {
        if self.authority_failed {
            Cause::AuthorityDown
        } else if self.retry_of_acknowledged {
            Cause::RetryOfAcknowledged
        } else if self.region_down {
            Cause::RegionDown
        } else if self.crashed_edge_lease {
            Cause::CrashedEdgeLease
        } else if self.partitioned_edge_lease {
            Cause::PartitionedEdgeLease
        } else if self.debt_unreconciled {
            Cause::DebtUnreconciled
        } else {
            Cause::RegionShort
        }
    }
}

/// Whether a false refusal with several regions is within the stated multi-region rule
/// (docs/answer.md): a region refuses only what it, the authority and the idle regions cannot
/// pay together, so what the refusal leaves unspent is held by the other regions (busy ones),
/// on their edges' leases or as their overdraft room. `elsewhere` is what the other regions
/// hold of the account; `available` the model's answer. The authority being unreachable must be
/// said as such, as with one region.
pub fn multi_region_refusal_allowed(
    cause: Cause,
    answer: Answer,
    cost: Credits,
    available: Credits,
    elsewhere: Credits,
) -> bool {
    match cause {
        Cause::AuthorityDown => matches!(answer, Answer::AuthorityUnreachable { .. }),
        Cause::RetryOfAcknowledged
        | Cause::CrashedEdgeLease
        | Cause::PartitionedEdgeLease
        | Cause::DebtUnreconciled
        | Cause::RegionDown => true,
        Cause::RegionShort => available.micros() - elsewhere.micros() < cost.micros(),
    }
}

/// Whether a false refusal breaks the run. With one region an edge refuses only what the
/// account's own ledger refuses, with three stated exceptions (docs/answer.md), all counted:
/// while the authority is unreachable, and then only under its own code
/// (`AuthorityUnreachable`: an `Insufficient` answer then would tell the caller the account is
/// short when nobody knows); credits on the lease of an edge that crashed, out of reach
/// until the lease expires (every live edge gives its lease back when recalled); and overdraft
/// room used by a spend a later grant settles, until that spend is reconciled. A retry of a
/// spend already acknowledged is counted apart (see [`Cause::RetryOfAcknowledged`]).
pub fn judge(regions: usize, cause: Cause, answer: Answer) -> bool {
    if regions > 1 {
        // Judged with what the other regions hold (`multi_region_refusal_allowed`).
        return true;
    }
    match cause {
        Cause::AuthorityDown => matches!(answer, Answer::AuthorityUnreachable { .. }),
        Cause::RetryOfAcknowledged
        | Cause::CrashedEdgeLease
        | Cause::PartitionedEdgeLease
        | Cause::DebtUnreconciled => true,
        Cause::RegionDown | Cause::RegionShort => false,
    }
}

/// The oracle's figures for a run (or, summed, for many).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OracleFigures {
    /// Spending decisions compared with the model (allowed or refused for want of credits),
    /// by kind. Replays of a decision already made are not new decisions.
    pub decisions: BTreeMap<&'static str, u64>,
    /// Refusals for want of credits the model agrees with, by kind.
    pub true_refusals: BTreeMap<&'static str, u64>,
    /// Refusals the model says the account could have paid, by kind and cause.
    pub false_refusals: BTreeMap<(&'static str, &'static str), u64>,
    /// Of those, with several regions, the ones outside the multi-region rule, by kind.
    pub beyond_rule: BTreeMap<&'static str, u64>,
    /// Spends or holds the edges allowed that the model would have refused, by kind.
    pub overspends: BTreeMap<&'static str, u64>,
    /// Debits whose draws were not the burn-down rules' draws (the model applies the draws
    /// the edge reported, as the ledger does), by kind.
    pub off_order: BTreeMap<&'static str, u64>,
    /// Captures and refunds the model could not apply as the edges did.
    pub model_disagreements: u64,
    /// Balances an edge reported after a debit (`Debited::balance_after`), compared with the
    /// model's balance, by kind; and how many differed.
    pub balances_compared: BTreeMap<&'static str, u64>,
    pub balance_mismatches: BTreeMap<&'static str, u64>,
    /// Of those, the ones some part of which no [`BalanceClass`] explains, by kind.
    pub balance_unexplained: BTreeMap<&'static str, u64>,
    /// Differing balances by kind and the classes that explain them (one difference may have
    /// several parts, each counted).
    pub balance_classes: BTreeMap<(&'static str, &'static str), u64>,
}

fn bump<K: Ord>(map: &mut BTreeMap<K, u64>, key: K) {
    *map.entry(key).or_default() += 1;
}

fn add_all<K: Ord + Clone>(into: &mut BTreeMap<K, u64>, from: &BTreeMap<K, u64>) {
    for (key, count) in from {
        *into.entry(key.clone()).or_default() += count;
    }
}

impl OracleFigures {
    pub fn decision(&mut self, kind: DecisionKind) {
        bump(&mut self.decisions, kind.name());
    }

    pub fn true_refusal(&mut self, kind: DecisionKind) {
        bump(&mut self.true_refusals, kind.name());
    }

    pub fn false_refusal(&mut self, kind: DecisionKind, cause: Cause) {
        bump(&mut self.false_refusals, (kind.name(), cause.name()));
    }

    pub fn beyond_rule(&mut self, kind: DecisionKind) {
        bump(&mut self.beyond_rule, kind.name());
    }

    pub fn overspend(&mut self, kind: DecisionKind) {
        bump(&mut self.overspends, kind.name());
    }

    pub fn off_order(&mut self, kind: DecisionKind) {
        bump(&mut self.off_order, kind.name());
    }

    /// A compared balance; when it differs, `parts` are the classes of its difference.
    pub fn balance(&mut self, kind: DecisionKind, matches: bool, parts: &[BalanceClass]) {
        bump(&mut self.balances_compared, kind.name());
        if matches {
            return;
        }
        bump(&mut self.balance_mismatches, kind.name());
        if parts.is_empty() || parts.iter().any(|p| !p.explained()) {
            bump(&mut self.balance_unexplained, kind.name());
        }
        for part in parts {
            bump(&mut self.balance_classes, (kind.name(), part.name()));
        }
    }

    pub fn balance_unexplained_total(&self) -> u64 {
        self.balance_unexplained.values().sum()
    }

    pub fn false_refusals_total(&self) -> u64 {
        self.false_refusals.values().sum()
    }

    /// Adds another run's figures.
    pub fn add(&mut self, other: &OracleFigures) {
        add_all(&mut self.decisions, &other.decisions);
        add_all(&mut self.true_refusals, &other.true_refusals);
        add_all(&mut self.false_refusals, &other.false_refusals);
        add_all(&mut self.beyond_rule, &other.beyond_rule);
        add_all(&mut self.overspends, &other.overspends);
        add_all(&mut self.off_order, &other.off_order);
        self.model_disagreements += other.model_disagreements;
        add_all(&mut self.balances_compared, &other.balances_compared);
        add_all(&mut self.balance_mismatches, &other.balance_mismatches);
        add_all(&mut self.balance_unexplained, &other.balance_unexplained);
        add_all(&mut self.balance_classes, &other.balance_classes);
    }
}

/// A map as `a 3, b 4` (or `none`).
fn list<K>(map: &BTreeMap<K, u64>, name: impl Fn(&K) -> String) -> String {
    if map.is_empty() {
        return "none".into();
    }
    map.iter()
        .map(|(key, count)| format!("{} {count}", name(key)))
        .collect::<Vec<_>>()
        .join(", ")
}

impl fmt::Display for OracleFigures {
    /// Four lines: decisions and refusals, false refusals by kind and cause, the rest, and the
    /// differing balances by class.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let total: u64 = self.decisions.values().sum();
        let refused: u64 = self.true_refusals.values().sum();
        writeln!(
            f,
            "decisions compared with the model {total} ({}); refusals the model agrees with {refused} ({})",
            list(&self.decisions, |k| k.to_string()),
            list(&self.true_refusals, |k| k.to_string())
        )?;
        writeln!(
            f,
            "false refusals {} ({}); outside the multi-region rule {} ({})",
            self.false_refusals_total(),
            list(&self.false_refusals, |(kind, cause)| format!(
                "{kind}/{cause}"
            )),
            self.beyond_rule.values().sum::<u64>(),
            list(&self.beyond_rule, |k| k.to_string())
        )?;
        let compared: u64 = self.balances_compared.values().sum();
        let mismatched: u64 = self.balance_mismatches.values().sum();
        writeln!(
            f,
            "allowed beyond the model {} ({}); drawn off the burn-down order {} ({}); model disagreements {}; balances compared {compared}, differing {mismatched} ({})",
            self.overspends.values().sum::<u64>(),
            list(&self.overspends, |k| k.to_string()),
            self.off_order.values().sum::<u64>(),
            list(&self.off_order, |k| k.to_string()),
            self.model_disagreements,
            list(&self.balance_mismatches, |k| k.to_string())
        )?;
        let unexplained = self.balance_unexplained_total();
        write!(
            f,
            "differing balances explained {} (parts: {}); unexplained {unexplained} ({})",
            mismatched - unexplained,
            list(&self.balance_classes, |(kind, class)| format!(
                "{kind}/{class}"
            )),
            list(&self.balance_unexplained, |k| k.to_string())
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHORT: Answer = Answer::Insufficient {
        available: Credits::ZERO,
    };
    const UNREACHABLE: Answer = Answer::AuthorityUnreachable {
        available: Credits::ZERO,
    };

    #[test]
    fn one_region_allows_a_false_refusal_only_for_the_stated_bounds() {
        assert!(judge(1, Cause::AuthorityDown, UNREACHABLE));
        assert!(!judge(1, Cause::AuthorityDown, SHORT));
        assert!(!judge(1, Cause::RegionShort, SHORT));
        assert!(!judge(1, Cause::RegionShort, UNREACHABLE));
        assert!(judge(1, Cause::CrashedEdgeLease, SHORT));
        assert!(judge(1, Cause::DebtUnreconciled, SHORT));
        assert!(!judge(1, Cause::RegionDown, SHORT));
    }

    #[test]
    fn several_regions_may_leave_unspent_only_what_the_others_hold() {
        let c = Credits::from_micros;
        let rule = |cost, available, elsewhere| {
            multi_region_refusal_allowed(
                Cause::RegionShort,
                SHORT,
                c(cost),
                c(available),
                c(elsewhere),
            )
        };
        // 10 available, 4 of them in other regions: 6 could have been paid here. Refusing 7
        // is within the rule, refusing 5 is not.
        assert!(rule(7, 10, 4));
        assert!(!rule(5, 10, 4));
        assert!(!rule(6, 10, 4));
        assert!(!multi_region_refusal_allowed(
            Cause::AuthorityDown,
            SHORT,
            c(7),
            c(10),
            c(10)
        ));
    }

    #[test]
    fn a_differing_balance_is_unexplained_only_when_a_part_is() {
        let mut figures = OracleFigures::default();
        figures.balance(DecisionKind::DebitStrict, true, &[]);
        figures.balance(
            DecisionKind::DebitStrict,
            false,
            &[BalanceClass::OtherEdgesLeases],
        );
        figures.balance(
            DecisionKind::DebitCached,
            false,
            &[BalanceClass::RegionAsLastRead, BalanceClass::Unexplained],
        );
        assert_eq!(figures.balances_compared.values().sum::<u64>(), 3);
        assert_eq!(figures.balance_mismatches.values().sum::<u64>(), 2);
        assert_eq!(figures.balance_unexplained_total(), 1);
        assert_eq!(figures.balance_unexplained.get("debit_cached"), Some(&1));
        assert_eq!(
            figures
                .balance_classes
                .get(&("debit_strict", "other_edges_leases")),
            Some(&1)
        );
        let text = figures.to_string();
        assert!(
            text.contains("differing balances explained 1 ") && text.contains("unexplained 1 "),
            "{text}"
        );
    }

    #[test]
    fn the_first_circumstance_names_the_cause() {
        let all = Circumstances {
            authority_failed: true,
            retry_of_acknowledged: true,
            region_down: true,
            crashed_edge_lease: true,
            partitioned_edge_lease: true,
            debt_unreconciled: true,
        };
        assert_eq!(all.cause(), Cause::AuthorityDown);
        let partitioned = Circumstances {
            partitioned_edge_lease: true,
            debt_unreconciled: true,
            ..Circumstances::default()
        };
        assert_eq!(partitioned.cause(), Cause::PartitionedEdgeLease);
        assert!(judge(
            1,
            Cause::PartitionedEdgeLease,
            Answer::Insufficient {
                available: Credits::ZERO
            }
        ));
        let debt = Circumstances {
            debt_unreconciled: true,
            ..Circumstances::default()
        };
        assert_eq!(debt.cause(), Cause::DebtUnreconciled);
        assert_eq!(Circumstances::default().cause(), Cause::RegionShort);
    }
}
