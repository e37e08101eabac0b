//! What the ledger hands back: accounts with their materialized balance, grants, entries,
//! receipts of mutations, outcomes of usage batches, pages, and verification reports.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use tollgate_core::command::Metadata;
use tollgate_core::{
    AccountId, ActorId, Credits, DebitId, EntryKind, FeatureKey, Grant, GrantId, Movement,
    PriceRule, Quantity, Rate, RegionId, Timestamp, Totals,
};

use crate::error::{LedgerError, Refusal};

/// Largest page of entries or grants one query returns.
pub const PAGE_SIZE_MAX: u32 = 1_000;
/// Page size when the caller names none.
pub const PAGE_SIZE_DEFAULT: u32 = 100;
/// Most debits in one usage batch (one transaction).
pub const USAGE_BATCH_MAX: usize = 10_000;
/// Most open grants with credits left one account may have. An allocation and a negative
/// adjustment read them all, so this bounds their work; grants spent to zero do not count.
pub const OPEN_GRANTS_MAX: usize = 10_000;
/// Most problems one verification reports before it stops listing them.
pub const VERIFY_PROBLEMS_MAX: usize = 1_000;
/// Entries read per query while verifying a chain.
pub const VERIFY_PAGE_ENTRIES: u32 = 10_000;
/// Most kinds one entry filter may name (there are only eight).
pub const FILTER_KINDS_MAX: usize = 8;
/// Longest unit name a debit may record, in bytes (the authority allows no longer a feature
/// unit).
pub const UNIT_BYTES_MAX: usize = 64;

/// An account as the ledger keeps it: the balance and every term of the balance equation are
/// materialized on the account row, so reading them costs one row whatever the history.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccountSnapshot {
    pub account: AccountId,
    pub overdraft_limit: Credits,
    /// What the account owes (zero or more).
    pub debt: Credits,
    /// `Σ remaining − debt`.
    pub balance: Credits,
    pub totals: Totals,
    /// Entries so far; the last entry's sequence number.
    pub entry_count: u64,
    /// Hash of the last entry, hex (64 zeros before the first).
    pub last_hash: String,
    pub metadata: Metadata,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
}

/// A grant as stored, with its labels.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GrantRecord {
    pub account: AccountId,
    pub grant: Grant,
    pub metadata: Metadata,
    pub created_at: Timestamp,
}

/// One immutable money movement, hash-chained to the account's previous entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub account: AccountId,
    /// 1, 2, 3, … per account, without gaps.
    pub seq: u64,
    pub kind: EntryKind,
    /// A magnitude, except for `adjust` where it is signed.
    pub amount: Credits,
    /// The grant it touched; `None` when it moved debt.
    pub grant_id: Option<GrantId>,
    pub debit_id: Option<DebitId>,
    /// What caused it: `key:<idempotency key>` for admin mutations, `debit:<id>` for usage.
    pub operation: String,
    pub feature: Option<FeatureKey>,
    pub actor: Option<ActorId>,
    pub region: Option<RegionId>,
    pub price_version: Option<u64>,
    pub price_rule: Option<PriceRule>,
    /// How many units a usage debit was priced for; `None` when its caller named the cost,
    /// for entries written before quantities were kept, and for every other kind of entry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quantity: Option<Quantity>,
    /// The unit the quantity counts ("image", "token"), as the feature named it then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unit: Option<String>,
    /// The credits per unit the debit was priced at; `None` as for `quantity`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate: Option<Rate>,
    pub memo: String,
    /// When it happened (a debit's event time).
    pub event_at: Timestamp,
    /// When the ledger recorded it.
    pub recorded_at: Timestamp,
    /// Hex sha256 of the previous entry of the account (64 zeros for the first).
    pub prev_hash: String,
    /// Hex sha256 over `prev_hash` and this entry's canonical fields.
    pub hash: String,
}

/// What a mutation did.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Receipt {
    pub account: AccountId,
    pub operation: String,
    pub movements: Vec<Movement>,
    /// Sequence numbers of the entries written, `first_seq..=last_seq`; none when both are 0.
    pub first_seq: u64,
    pub last_seq: u64,
    pub balance: Credits,
    /// The grant the mutation created, if it created one.
    pub grant_id: Option<GrantId>,
    pub recorded_at: Timestamp,
    /// True when this is the stored result of an earlier request with the same key.
    pub replayed: bool,
}

/// A mutation's result: done, or refused with nothing moved.
pub type Outcome = Result<Receipt, Refusal>;

/// The result of one debit of a usage batch.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum UsageOutcome {
    Applied {
        debit_id: DebitId,
        first_seq: u64,
        last_seq: u64,
    },
    /// Seen before (in an earlier batch or earlier in this one); nothing moved.
    Duplicate { debit_id: DebitId },
    /// The ledger cannot take it (it names an unknown grant, or draws more than is left);
    /// nothing moved. The reconciler parks it for an operator.
    Refused { debit_id: DebitId, refusal: Refusal },
}

/// How many decisions may reuse one debit id (the same idempotency key in one region, each
/// after the region forgot the one before): the ledger tells them apart by generation.
pub const DEBIT_GENERATIONS_MAX: u32 = 1_000;

/// The id of the `generation`th decision charged under `base` (1 is `base` itself). A region
/// forgets an idempotency key after its retention (24 h); the ledger keeps debit ids for
/// ever. A key reused after that is a new decision, charged under the next generation,
/// never taken for a replay of the first (see `LedgerStore::apply_usage`).
pub fn debit_generation(base: &DebitId, generation: u32) -> Result<DebitId, LedgerError> {
    if generation <= 1 {
        return Ok(base.clone());
    }
    DebitId::new(format!("{base}.g{generation}")).map_err(|e| LedgerError::invalid("debit_id", e))
}

/// Which entries of one account to list.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EntryFilter {
    pub account: AccountId,
    /// Empty: every kind.
    pub kinds: Vec<EntryKind>,
    pub grant: Option<GrantId>,
    pub debit: Option<DebitId>,
    /// Event time at or after.
    pub from: Option<Timestamp>,
    /// Event time strictly before.
    pub until: Option<Timestamp>,
}

impl EntryFilter {
    pub fn account(account: AccountId) -> Self {
        EntryFilter {
            account,
            kinds: Vec::new(),
            grant: None,
            debit: None,
            from: None,
            until: None,
        }
    }
}

/// A page request: a size (0 means the default) and the token of the previous page.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PageRequest {
    pub size: u32,
    pub token: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Page<T> {
    pub items: Vec<T>,
    /// Present when more items may follow.
    pub next_token: Option<String>,
}

/// Which debits (or entries) a report reads: one account or every account, and a window of
/// event time `[from, until)`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DebitQuery {
    pub account: Option<AccountId>,
    pub from: Timestamp,
    pub until: Timestamp,
}

/// A reconciled debit as reports read it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DebitRow {
    pub account: AccountId,
    pub debit_id: DebitId,
    pub feature: FeatureKey,
    pub actor: Option<ActorId>,
    pub region: Option<RegionId>,
    /// The event time.
    pub at: Timestamp,
    pub amount: Credits,
    /// Refunded so far (draws and overdraft).
    pub refunded: Credits,
    pub overdraft: Credits,
    pub draws: Vec<tollgate_core::Draw>,
    /// What the debit was priced with, as on its entries; `None` when its caller named the
    /// cost or it was recorded before quantities were kept. (Absent from JSON when `None`, so
    /// JSON written before they existed reads back.)
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quantity: Option<Quantity>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unit: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate: Option<Rate>,
}

/// What `verify` found wrong.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProblemKind {
    /// An entry's stored hash is not the hash of its fields: the entry was changed.
    HashMismatch,
    /// An entry's `prev_hash` is not the previous entry's hash: an entry was removed or inserted.
    ChainBroken,
    /// Sequence numbers skip or repeat.
    SequenceGap,
    /// A stored entry cannot be read back into valid values.
    UnreadableEntry,
    /// The account row's running totals differ from the sum of its entries.
    TotalsMismatch,
    /// `granted − debited + refunded − expired − voided + adjusted ≠ Σ remaining − debt`.
    BalanceEquation,
    /// The materialized balance differs from `Σ remaining − debt`.
    BalanceMismatch,
    /// A grant's remaining is outside `0..=amount`.
    GrantOutOfRange,
    /// A grant's remaining differs from what its entries say.
    GrantMismatch,
    /// The account's debt differs from what its entries say.
    DebtMismatch,
    /// The account row's last hash or entry count differs from its last entry.
    ChainHeadMismatch,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Problem {
    pub account: AccountId,
    /// The entry that is wrong, when one is.
    pub seq: Option<u64>,
    /// The grant that is wrong, when one is.
    pub grant: Option<GrantId>,
    pub kind: ProblemKind,
    pub detail: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerifyReport {
    pub accounts_checked: u64,
    pub entries_checked: u64,
    pub problems: Vec<Problem>,
    /// More problems were found than [`VERIFY_PROBLEMS_MAX`].
    pub truncated: bool,
}

impl VerifyReport {
    pub fn is_clean(&self) -> bool {
        self.problems.is_empty()
    }

    pub(crate) fn push(&mut self, problem: Problem) {
        if self.problems.len() < VERIFY_PROBLEMS_MAX {
            self.problems.push(problem);
        } else {
            self.truncated = true;
        }
    }
}

/// Open grants by id, as loaded for one mutation.
pub(crate) type GrantMap = BTreeMap<GrantId, Grant>;
