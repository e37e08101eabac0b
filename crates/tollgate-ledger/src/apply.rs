//! The part of a mutation that is the same on every backend: turning the core's movements into
//! hash-chained entries, finding which grants changed, and updating the account's materialized
//! balance and totals. Pure; the SQL backends only read the inputs and write the outputs.

use sha2::{Digest, Sha256};
use tollgate_core::{
    AccountBook, ActorId, Credits, DebitId, FeatureKey, Grant, Movement, PriceRule, Quantity, Rate,
    RegionId, Timestamp,
};

use crate::chain::entry_hash;
use crate::error::LedgerError;
use crate::model::{
    AccountSnapshot, Entry, GrantMap, PageRequest, PAGE_SIZE_DEFAULT, PAGE_SIZE_MAX,
};

/// What every entry of one operation shares.
#[derive(Clone, Debug, Default)]
pub(crate) struct Context {
    pub operation: String,
    pub debit_id: Option<DebitId>,
    pub feature: Option<FeatureKey>,
    pub actor: Option<ActorId>,
    pub region: Option<RegionId>,
    pub price_version: Option<u64>,
    pub price_rule: Option<PriceRule>,
    /// What a usage debit was priced with; `None` for every other operation.
    pub quantity: Option<Quantity>,
    pub unit: Option<String>,
    pub rate: Option<Rate>,
    pub memo: String,
    /// `None`: the time the mutation is recorded.
    pub event_at: Option<Timestamp>,
}

/// What one transaction writes.
#[derive(Debug)]
pub(crate) struct Changes {
    pub entries: Vec<Entry>,
    pub new_grants: Vec<Grant>,
    pub changed_grants: Vec<Grant>,
    pub account: AccountSnapshot,
    /// `(first_seq, last_seq)` of each group of movements; `(0, 0)` for an empty group.
    pub ranges: Vec<(u64, u64)>,
}

/// Builds the writes for `groups` of movements the core produced on `book`, which was rebuilt
/// from `before` and the `loaded` grants.
pub(crate) fn changes(
    before: &AccountSnapshot,
    loaded: &GrantMap,
    book: &AccountBook,
    groups: &[(Vec<Movement>, Context)],
    now: Timestamp,
) -> Result<Changes, LedgerError> {
    let mut account = before.clone();
    let mut entries = Vec::new();
    let mut ranges = Vec::with_capacity(groups.len());
    for (movements, context) in groups {
        let first = account.entry_count.saturating_add(1);
        for movement in movements {
            let entry = next_entry(&account, movement, context, now)?;
            account.entry_count = entry.seq;
            account.last_hash = entry.hash.clone();
            entries.push(entry);
        }
        ranges.push(if movements.is_empty() {
            (0, 0)
        } else {
            (first, account.entry_count)
        });
    }

    // The balance moves by what the grants and the debt moved, computed independently of the
    // totals; the two must agree or the stored state was inconsistent to begin with.
    let mut held_change: i128 = 0;
    let mut new_grants = Vec::new();
    let mut changed_grants = Vec::new();
    for grant in book.grants() {
        match loaded.get(&grant.id) {
            None => {
                held_change += i128::from(grant.remaining.micros());
                new_grants.push(grant.clone());
            }
            Some(old) if old != grant => {
                held_change +=
                    i128::from(grant.remaining.micros()) - i128::from(old.remaining.micros());
                changed_grants.push(grant.clone());
            }
            Some(_) => {}
        }
    }
    let debt_change = i128::from(book.debt().micros()) - i128::from(before.debt.micros());
    let balance = i128::from(before.balance.micros()) + held_change - debt_change;
    let balance = i64::try_from(balance)
        .map(Credits::from_micros)
        .map_err(|_| LedgerError::corrupt("balance out of range"))?;
    account.debt = book.debt();
    account.totals = *book.totals();
    account.balance = balance;
    account.updated_at = now;
    let expected = account
        .totals
        .expected_balance()
        .map_err(|_| LedgerError::corrupt("totals out of range"))?;
    if expected != balance {
        return Err(LedgerError::corrupt(format!(
            "account {}: entries say the balance is {expected} but grants and debt hold {balance}",
            account.account
        )));
    }
    Ok(Changes {
        entries,
        new_grants,
        changed_grants,
        account,
        ranges,
    })
}

fn next_entry(
    account: &AccountSnapshot,
    movement: &Movement,
    context: &Context,
    now: Timestamp,
) -> Result<Entry, LedgerError> {
    let mut entry = Entry {
        account: account.account.clone(),
        seq: account.entry_count.saturating_add(1),
        kind: movement.kind,
        amount: movement.amount,
        grant_id: movement.grant_id.clone(),
        debit_id: context.debit_id.clone(),
        operation: context.operation.clone(),
        feature: context.feature.clone(),
        actor: context.actor.clone(),
        region: context.region.clone(),
        price_version: context.price_version,
        price_rule: context.price_rule,
        quantity: context.quantity,
        unit: context.unit.clone(),
        rate: context.rate,
        memo: context.memo.clone(),
        event_at: context.event_at.unwrap_or(now),
        recorded_at: now,
        prev_hash: account.last_hash.clone(),
        hash: String::new(),
    };
    entry.hash = entry_hash(&entry)
        .ok_or_else(|| LedgerError::corrupt("the account's last hash is not 32 bytes of hex"))?;
    Ok(entry)
}

/// The fingerprint of an idempotent request: sha256 over its operation and canonical JSON.
pub(crate) fn fingerprint<T: serde::Serialize>(
    operation: &str,
    command: &T,
) -> Result<String, LedgerError> {
    let json = serde_json::to_vec(command).map_err(LedgerError::corrupt)?;
    let mut hasher = Sha256::new();
    hasher.update(operation.as_bytes());
    hasher.update([0]);
    hasher.update(&json);
    Ok(hex::encode(hasher.finalize()))
}

/// A page size within bounds: 0 means the default.
pub(crate) fn page_size(page: &PageRequest) -> Result<u32, LedgerError> {
    match page.size {
        0 => Ok(PAGE_SIZE_DEFAULT),
        size if size <= PAGE_SIZE_MAX => Ok(size),
        size => Err(LedgerError::invalid(
            "page_size",
            format!("{size}, at most {PAGE_SIZE_MAX} allowed"),
        )),
    }
}

const ENTRY_TOKEN_PREFIX: &str = "e1.";
const GRANT_TOKEN_PREFIX: &str = "g1.";

pub(crate) fn entry_token(seq: u64) -> String {
    format!("{ENTRY_TOKEN_PREFIX}{seq}")
}

/// The sequence number after which the page starts (0 for the first page).
pub(crate) fn entry_after(page: &PageRequest) -> Result<u64, LedgerError> {
    let Some(token) = page.token.as_deref().filter(|t| !t.is_empty()) else {
        return Ok(0);
    };
    token
        .strip_prefix(ENTRY_TOKEN_PREFIX)
        .and_then(|seq| seq.parse::<u64>().ok())
        .filter(|seq| i64::try_from(*seq).is_ok())
        .ok_or_else(|| LedgerError::invalid("page_token", "not a token this query returned"))
}

pub(crate) fn grant_token(grant: &str) -> String {
    format!("{GRANT_TOKEN_PREFIX}{grant}")
}

/// The grant id after which the page starts (empty for the first page).
pub(crate) fn grant_after(page: &PageRequest) -> Result<String, LedgerError> {
    let Some(token) = page.token.as_deref().filter(|t| !t.is_empty()) else {
        return Ok(String::new());
    };
    token
        .strip_prefix(GRANT_TOKEN_PREFIX)
        .filter(|id| tollgate_core::GrantId::new(*id).is_ok())
        .map(str::to_owned)
        .ok_or_else(|| LedgerError::invalid("page_token", "not a token this query returned"))
}

/// Converts stored integers back into checked values, naming the column that is wrong.
pub(crate) fn timestamp(column: &str, millis: i64) -> Result<Timestamp, LedgerError> {
    Timestamp::from_millis(millis)
        .map_err(|e| LedgerError::corrupt(format!("column {column}: {e}")))
}

pub(crate) fn u64_of(column: &str, value: i64) -> Result<u64, LedgerError> {
    u64::try_from(value).map_err(|_| LedgerError::corrupt(format!("column {column}: negative")))
}

pub(crate) fn i64_of(what: &'static str, value: u64) -> Result<i64, LedgerError> {
    i64::try_from(value).map_err(|_| LedgerError::invalid(what, "out of range"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_tokens_round_trip_and_reject_forgeries() {
        let page = |token: &str| PageRequest {
            size: 0,
            token: Some(token.to_owned()),
        };
        assert_eq!(entry_after(&page(&entry_token(41))).unwrap(), 41);
        assert_eq!(entry_after(&PageRequest::default()).unwrap(), 0);
        assert!(entry_after(&page("41")).is_err());
        assert!(entry_after(&page("e1.-1")).is_err());
        assert_eq!(grant_after(&page(&grant_token("g.1"))).unwrap(), "g.1");
        assert!(grant_after(&page("g1.bad id")).is_err());
    }

    #[test]
    fn page_sizes_are_bounded() {
        let size = |size| page_size(&PageRequest { size, token: None });
        assert_eq!(size(0).unwrap(), PAGE_SIZE_DEFAULT);
        assert_eq!(size(PAGE_SIZE_MAX).unwrap(), PAGE_SIZE_MAX);
        assert!(size(PAGE_SIZE_MAX + 1).is_err());
    }
}
