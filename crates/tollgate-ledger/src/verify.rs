//! Verification of one account, fed its entries in order: the hash chain, sequence numbers,
//! and then the balance equation, the materialized columns and every grant against what the
//! entries say. Pure; the stores stream rows into it.

use std::collections::BTreeMap;

use tollgate_core::{AccountId, Credits, EntryKind, Grant, GrantId, Totals};

use crate::chain::{entry_hash, GENESIS_HASH};
use crate::model::{AccountSnapshot, Entry, Problem, ProblemKind, VerifyReport};

pub(crate) struct ChainCheck {
    account: AccountId,
    next_seq: u64,
    prev_hash: String,
    totals: Totals,
    /// What each grant should hold according to its entries, in micro-credits.
    grant_net: BTreeMap<GrantId, i128>,
    /// What the account should owe according to its entries, in micro-credits.
    debt: i128,
    overflow: bool,
}

impl ChainCheck {
    pub(crate) fn new(account: AccountId) -> Self {
        ChainCheck {
            account,
            next_seq: 1,
            prev_hash: GENESIS_HASH.to_owned(),
            totals: Totals::default(),
            grant_net: BTreeMap::new(),
            debt: 0,
            overflow: false,
        }
    }

    fn problem(
        &self,
        seq: Option<u64>,
        grant: Option<GrantId>,
        kind: ProblemKind,
        detail: String,
    ) -> Problem {
        Problem {
            account: self.account.clone(),
            seq,
            grant,
            kind,
            detail,
        }
    }

    /// A row that could not be read back into an entry.
    pub(crate) fn unreadable(&mut self, seq: u64, detail: String, report: &mut VerifyReport) {
        report.push(self.problem(Some(seq), None, ProblemKind::UnreadableEntry, detail));
        self.next_seq = seq.saturating_add(1);
    }

    pub(crate) fn feed(&mut self, entry: &Entry, report: &mut VerifyReport) {
        report.entries_checked = report.entries_checked.saturating_add(1);
        let seq = Some(entry.seq);
        if entry.seq != self.next_seq {
            let detail = format!("expected entry {}, found {}", self.next_seq, entry.seq);
            report.push(self.problem(seq, None, ProblemKind::SequenceGap, detail));
        }
        if entry.prev_hash != self.prev_hash {
            let detail = format!(
                "prev_hash {} is not the previous entry's hash {}",
                entry.prev_hash, self.prev_hash
            );
            report.push(self.problem(seq, None, ProblemKind::ChainBroken, detail));
        }
        match entry_hash(entry) {
            Some(hash) if hash == entry.hash => {}
            Some(hash) => {
                let detail = format!(
                    "stored hash {} but the entry's fields hash to {hash}: the entry was changed",
                    entry.hash
                );
                report.push(self.problem(seq, None, ProblemKind::HashMismatch, detail));
            }
            None => {
                let detail = format!("prev_hash {:?} is not 32 bytes of hex", entry.prev_hash);
                report.push(self.problem(seq, None, ProblemKind::ChainBroken, detail));
            }
        }
        self.next_seq = entry.seq.saturating_add(1);
        self.prev_hash = entry.hash.clone();
        if self.totals.record(entry.kind, entry.amount).is_err() {
            self.overflow = true;
        }
        self.apply_to_holders(entry);
    }

    /// Moves the entry's amount on its grant (or the debt), as the ledger did when it wrote it.
    fn apply_to_holders(&mut self, entry: &Entry) {
        let amount = i128::from(entry.amount.micros());
        match &entry.grant_id {
            Some(grant) => {
                let created = !self.grant_net.contains_key(grant);
                let change = match entry.kind {
                    // The first entry on a grant creates it; rollover and refund entries on an
                    // existing grant carry credits out of it and back into it respectively.
                    _ if created => amount,
                    EntryKind::Grant | EntryKind::Refund | EntryKind::Adjust => amount,
                    EntryKind::Debit
                    | EntryKind::Expire
                    | EntryKind::Void
                    | EntryKind::Rollover
                    | EntryKind::Settle => -amount,
                };
                let net = self.grant_net.entry(grant.clone()).or_default();
                *net += change;
                if entry.kind == EntryKind::Settle {
                    self.debt -= amount;
                }
            }
            None => match entry.kind {
                EntryKind::Debit => self.debt += amount,
                EntryKind::Refund => self.debt -= amount,
                // A negative adjustment that grants could not cover: debt grows by its size.
                EntryKind::Adjust => self.debt -= amount,
                _ => {}
            },
        }
    }

    /// Compares what the entries say with the account row and its grants.
    pub(crate) fn finish(
        self,
        snapshot: &AccountSnapshot,
        grants: &[Grant],
        report: &mut VerifyReport,
    ) {
        report.accounts_checked = report.accounts_checked.saturating_add(1);
        let last_seq = self.next_seq.saturating_sub(1);
        if snapshot.entry_count != last_seq || snapshot.last_hash != self.prev_hash {
            let detail = format!(
                "account row says {} entries ending in {}, entries say {last_seq} ending in {}",
                snapshot.entry_count, snapshot.last_hash, self.prev_hash
            );
            report.push(self.problem(None, None, ProblemKind::ChainHeadMismatch, detail));
        }
        if self.overflow {
            let detail = "sums of entries overflow".to_owned();
            report.push(self.problem(None, None, ProblemKind::TotalsMismatch, detail));
        } else if self.totals != snapshot.totals {
            let detail = format!(
                "account row totals {:?} differ from the entries' {:?}",
                snapshot.totals, self.totals
            );
            report.push(self.problem(None, None, ProblemKind::TotalsMismatch, detail));
        }
        self.check_grants(snapshot, grants, report);
    }

    fn check_grants(
        &self,
        snapshot: &AccountSnapshot,
        grants: &[Grant],
        report: &mut VerifyReport,
    ) {
        let mut held: i128 = 0;
        for grant in grants {
            held += i128::from(grant.remaining.micros());
            if grant.remaining.is_negative() || grant.remaining > grant.amount {
                let detail = format!(
                    "remaining {} is outside 0..={}",
                    grant.remaining, grant.amount
                );
                report.push(self.problem(
                    None,
                    Some(grant.id.clone()),
                    ProblemKind::GrantOutOfRange,
                    detail,
                ));
            }
            let expected = self.grant_net.get(&grant.id).copied().unwrap_or(0);
            if expected != i128::from(grant.remaining.micros()) {
                let detail = format!(
                    "remaining {} but its entries say {}",
                    grant.remaining,
                    micros_text(expected)
                );
                report.push(self.problem(
                    None,
                    Some(grant.id.clone()),
                    ProblemKind::GrantMismatch,
                    detail,
                ));
            }
        }
        for grant in self.grant_net.keys() {
            if !grants.iter().any(|g| &g.id == grant) {
                let detail = "entries name a grant that does not exist".to_owned();
                report.push(self.problem(
                    None,
                    Some(grant.clone()),
                    ProblemKind::GrantMismatch,
                    detail,
                ));
            }
        }
        let debt = i128::from(snapshot.debt.micros());
        if debt != self.debt {
            let detail = format!(
                "debt {} but the entries say {}",
                snapshot.debt,
                micros_text(self.debt)
            );
            report.push(self.problem(None, None, ProblemKind::DebtMismatch, detail));
        }
        let actual = held - debt;
        if let Ok(expected) = self.totals.expected_balance() {
            if i128::from(expected.micros()) != actual {
                let detail = format!(
                    "the entries say the balance is {expected}, the grants and debt hold {}",
                    micros_text(actual)
                );
                report.push(self.problem(None, None, ProblemKind::BalanceEquation, detail));
            }
        }
        if i128::from(snapshot.balance.micros()) != actual {
            let detail = format!(
                "materialized balance {} but the grants and debt hold {}",
                snapshot.balance,
                micros_text(actual)
            );
            report.push(self.problem(None, None, ProblemKind::BalanceMismatch, detail));
        }
    }
}

fn micros_text(micros: i128) -> String {
    i64::try_from(micros)
        .map(|m| Credits::from_micros(m).to_string())
        .unwrap_or_else(|_| format!("{micros} micro-credits"))
}
