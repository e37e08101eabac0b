//! Commands, outcomes and records of the regional store, shared by both implementations.

use std::fmt;

use tollgate_core::{
    AccountId, ActorId, Credits, Draw, FeatureKey, GrantId, HoldId, IdempotencyKey, LeaseId,
    PriceRule, Quantity, Rate, Scope, Timestamp,
};

/// Largest amount the regional store holds for one account, in micro-credits: 2^53 − 1, the
/// largest integer Lua's numbers (doubles) hold exactly. That is about nine billion credits.
pub const REGION_MICROS_MAX: i64 = (1 << 53) - 1;
/// How long idempotency keys and ended holds are remembered, by default (24 hours).
pub const RETAIN_MS_DEFAULT: i64 = 24 * 3_600_000;
/// Most usage entries settled from a lease in one call.
pub const LEASE_SETTLE_ENTRIES_MAX: usize = 512;
/// Most usage records returned by one read of the usage stream.
pub const USAGE_READ_MAX: usize = 1_000;

/// A slice of a grant the authority has handed to this region.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SegmentSpec {
    pub grant_id: GrantId,
    pub amount: Credits,
    pub priority: u32,
    pub effective_at: Timestamp,
    pub expires_at: Option<Timestamp>,
    pub scope: Scope,
}

/// A segment as the region holds it now (or a slice of one in a lease).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Segment {
    pub grant_id: GrantId,
    pub remaining: Credits,
    pub priority: u32,
    pub effective_at: Timestamp,
    pub expires_at: Option<Timestamp>,
    pub scope: Scope,
}

impl Segment {
    pub fn is_active_at(&self, at: Timestamp) -> bool {
        self.effective_at <= at && self.expires_at.is_none_or(|expires_at| at < expires_at)
    }
}

/// The price a decision was made at, carried to the ledger.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PriceTag {
    /// The price book version; 0 when the caller named the cost.
    pub version: u64,
    pub rule: PriceRule,
    /// The units the caller asked for; `None` when it named the cost (or, for a capture, when
    /// less than the hold was taken: the credits taken are then not a whole number of units).
    pub quantity: Option<Quantity>,
    /// The credits per unit the quantity was priced at; `None` when the caller named the cost.
    pub rate: Option<Rate>,
}

impl PriceTag {
    /// A price with no quantity or rate: an explicit cost, or a record written before
    /// quantities were kept.
    pub const fn at(version: u64, rule: PriceRule) -> PriceTag {
        PriceTag {
            version,
            rule,
            quantity: None,
            rate: None,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DebitCommand {
    pub account: AccountId,
    pub key: IdempotencyKey,
    pub feature: FeatureKey,
    pub cost: Credits,
    pub now: Timestamp,
    pub actor: Option<ActorId>,
    pub price: PriceTag,
    /// The decision was already served (a cached decision whose lease expired before it was
    /// settled): it is recorded whatever the account holds, never refused. The segments pay
    /// what they can in burn-down order and the rest is overdraft, beyond the region's room if
    /// need be, for the authority to charge as debt or park where an operator sees it. Rate
    /// limits neither refuse nor count it. Not part of the fingerprint: a forced retry of a
    /// debit that was applied replays it.
    pub forced: bool,
}

/// Why credits were not spent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// Segments and overdraft room could not pay.
    Insufficient {
        available: Credits,
        shortfall: Credits,
    },
    /// The feature's token bucket is short; `retry_after_ms` is `None` when the cost is above
    /// the bucket's burst and can never pass.
    RateLimited {
        feature: FeatureKey,
        retry_after_ms: Option<u64>,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Allowed {
    pub draws: Vec<Draw>,
    pub overdraft: Credits,
    /// Credits left in the account's segments in this region after the decision, counting
    /// only segments effective and unexpired at the decision's time.
    pub pool: Credits,
    /// Overdraft room left in this region after the decision.
    pub overdraft_room: Credits,
    pub usage_id: UsageId,
    /// The event time the decision was made at (a reversal's window counts from it).
    pub at: Timestamp,
    /// True when this is the first result returned again for a repeated idempotency key.
    pub replayed: bool,
    /// The price the decision was first made at. A replay of a quantity can reach a node that
    /// prices it differently (a newer price book version in effect): the replay is still the
    /// first decision, at the first price. `None` for a result stored before prices were kept
    /// with it.
    pub price: Option<PriceTag>,
    /// The account's move count in the region when the decision was made
    /// ([`AccountView::moves`]); `None` for a replay (the first decision's figures, not now's).
    pub moves: Option<u64>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DebitOutcome {
    Allowed(Allowed),
    Refused(Refusal),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuthorizeCommand {
    pub account: AccountId,
    pub key: IdempotencyKey,
    pub hold_id: HoldId,
    pub feature: FeatureKey,
    pub cost: Credits,
    pub now: Timestamp,
    pub expires_at: Timestamp,
    pub actor: Option<ActorId>,
    pub price: PriceTag,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HoldPlaced {
    pub draws: Vec<Draw>,
    pub overdraft: Credits,
    pub expires_at: Timestamp,
    pub replayed: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AuthorizeOutcome {
    Held(HoldPlaced),
    Refused(Refusal),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CaptureCommand {
    pub account: AccountId,
    pub key: IdempotencyKey,
    pub hold_id: HoldId,
    /// At most the held amount; `None` captures all of it.
    pub amount: Option<Credits>,
    pub now: Timestamp,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Captured {
    pub draws: Vec<Draw>,
    pub overdraft: Credits,
    /// What went back to the segments.
    pub released: Credits,
    pub usage_id: UsageId,
    pub replayed: bool,
}

/// Why a capture or release was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HoldRefusal {
    UnknownHold,
    AlreadyCaptured,
    AlreadyReleased,
    Expired,
    ExceedsHold { held: Credits },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CaptureOutcome {
    Captured(Captured),
    Refused(HoldRefusal),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReleaseCommand {
    pub account: AccountId,
    pub key: IdempotencyKey,
    pub hold_id: HoldId,
    pub now: Timestamp,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReleaseOutcome {
    Released { amount: Credits, replayed: bool },
    Refused(HoldRefusal),
}

/// Undo a debit, named by its idempotency key, within `window_ms` of its event time.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReverseCommand {
    pub account: AccountId,
    /// The reversal's own key: a repeated reversal returns the first result.
    pub key: IdempotencyKey,
    pub debit_key: IdempotencyKey,
    pub now: Timestamp,
    pub window_ms: i64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReverseRefusal {
    /// No debit under that key (never made, or forgotten after the retention).
    UnknownDebit,
    WindowClosed,
    AlreadyReversed,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReverseOutcome {
    Reversed {
        amount: Credits,
        usage_id: UsageId,
        replayed: bool,
    },
    Refused(ReverseRefusal),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseRequest {
    pub account: AccountId,
    pub key: IdempotencyKey,
    pub lease_id: LeaseId,
    pub amount: Credits,
    pub now: Timestamp,
    pub expires_at: Timestamp,
}

/// What an edge node holds after taking or topping up its lease.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lease {
    /// What this call added.
    pub granted: Credits,
    /// Overdraft room the lease holds in all.
    pub overdraft: Credits,
    pub expires_at: Timestamp,
    /// Every slice the lease holds, with its segment's priority, window and scope.
    pub slices: Vec<Segment>,
    pub replayed: bool,
}

/// One decision an edge node made from its lease.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseUsage {
    pub key: IdempotencyKey,
    pub feature: FeatureKey,
    pub at: Timestamp,
    pub draws: Vec<Draw>,
    pub overdraft: Credits,
    pub actor: Option<ActorId>,
    pub price: PriceTag,
}

impl LeaseUsage {
    pub fn cost(&self) -> Credits {
        Credits::checked_sum(self.draws.iter().map(|d| d.amount).chain([self.overdraft]))
            .unwrap_or(Credits::MAX)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseSettlement {
    pub account: AccountId,
    pub lease_id: LeaseId,
    pub now: Timestamp,
    /// The lease's new expiry (settling keeps a live edge's lease alive).
    pub expires_at: Timestamp,
    pub entries: Vec<LeaseUsage>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SettleStatus {
    /// Charged: by this call, or by an earlier call carrying this very decision (same request,
    /// time, draws and lease) whose reply was lost, in which case the id is the first charge's.
    Recorded(UsageId),
    /// The key was remembered for a different request (a reused key with another body): the
    /// decision was served, so it is charged, under `key`, derived from its own (see
    /// [`derived_key`](crate::derived_key)). The edge treats it as recorded.
    Rekeyed {
        usage_id: UsageId,
        key: IdempotencyKey,
    },
    /// The same request was charged already (by this or another edge, or earlier in the same
    /// settlement): nothing is charged again and the edge credits the amount back to its lease.
    Duplicate,
    /// The entry does not fit the lease (a bug in the edge); nothing is charged.
    Rejected(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SettleOutcome {
    Settled(Vec<SettleStatus>),
    /// The lease expired and went back to the segments before this settlement arrived.
    NoLease,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RatePeriod {
    Second,
    Minute,
    Hour,
}

impl RatePeriod {
    pub const fn millis(self) -> i64 {
        match self {
            RatePeriod::Second => 1_000,
            RatePeriod::Minute => 60_000,
            RatePeriod::Hour => 3_600_000,
        }
    }
}

/// A token bucket of credits: `amount` per `period`, holding at most `burst`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RateLimit {
    pub amount: Credits,
    pub period: RatePeriod,
    pub burst: Credits,
}

/// The account as one region sees it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AccountView {
    pub segments: Vec<Segment>,
    pub overdraft_limit: Credits,
    pub overdraft_used: Credits,
    /// Credits set aside by pending holds.
    pub held: Credits,
    pub holds_pending: u64,
    /// The grants pending holds set credits aside from, in id order: an expiry or period close
    /// of one of them waits for those holds (their captures carry the authorization's time).
    pub held_grants: Vec<tollgate_core::GrantId>,
    /// Credits out on edge nodes' leases.
    pub leased: Credits,
    pub leases: u64,
    /// How many usage records the account has had in this region: the last one's
    /// [`UsageRecord::seq`].
    pub usage_seq: u64,
    /// How many times the authority has moved credits or overdraft room into or out of the
    /// region for the account (installs, take-backs, overdraft limit changes). A summary whose
    /// [`AccountSummary::region_moves`] is another count was published before or after the
    /// region's figures read with it.
    pub moves: u64,
}

impl AccountView {
    /// Credits left in the segments (not held, not leased).
    pub fn pool(&self) -> Credits {
        Credits::checked_sum(self.segments.iter().map(|s| s.remaining)).unwrap_or(Credits::MAX)
    }
}

/// How far the usage stream is behind its reader: what [`crate::RegionStore::usage_backlog`]
/// answers. Acknowledged records are deleted, so every record still in the stream waits for
/// the authority (delivered and not acknowledged, or not delivered yet).
/// One read of the usage stream ([`crate::RegionStore::read_usage_to_end`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UsageRead {
    pub records: Vec<UsageRecord>,
    /// The read reached the stream's end: nothing was left pending for the consumer, and no
    /// record appended before the read is beyond those answered. Everything decided before
    /// the read started is then delivered (a drained stream, even under steady traffic).
    pub at_end: bool,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UsageBacklog {
    /// Records in the stream.
    pub records: u64,
    /// When the oldest of them was appended (ms since the epoch, from its id); `None` when
    /// the stream is empty.
    pub oldest_appended_ms: Option<i64>,
}

/// The append time (ms) a usage record id starts with: `<ms>-<n>`, as Redis and the
/// in-memory store both make them.
pub fn usage_id_millis(id: &str) -> Option<i64> {
    id.split_once('-')
        .map_or(id, |(ms, _)| ms)
        .parse::<i64>()
        .ok()
        .filter(|ms| *ms >= 0)
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct UsageId(pub String);

impl fmt::Display for UsageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UsageKind {
    Debit,
    Capture,
    /// A debit undone: its draws go back (the ledger refunds it); `key` is the debit's key.
    Reverse,
}

/// One decision that moved credits, as the authority reads it from the usage stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UsageRecord {
    pub id: UsageId,
    pub kind: UsageKind,
    pub account: AccountId,
    pub key: IdempotencyKey,
    pub feature: FeatureKey,
    /// The event time: the decision's, or the authorization's for a capture.
    pub at: Timestamp,
    pub cost: Credits,
    pub draws: Vec<Draw>,
    pub overdraft: Credits,
    /// Credits left in the account's segments after this decision, so the authority knows when
    /// to refill.
    pub pool: Credits,
    pub overdraft_room: Credits,
    pub actor: Option<ActorId>,
    pub price: PriceTag,
    pub hold_id: Option<HoldId>,
    pub lease_id: Option<LeaseId>,
    /// The account's record number in this region: 1, 2, 3, … in stream order (0 for records
    /// written before numbering).
    pub seq: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SegmentInstalled {
    pub remaining: Credits,
    pub pool: Credits,
    pub replayed: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TakenBack {
    pub taken: Credits,
    pub remaining: Credits,
    pub pool: Credits,
    /// Usage records of the account beyond the caller's `reconciled`: when positive, nothing
    /// was taken.
    pub unreconciled: u64,
    pub replayed: bool,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RegionError {
    #[error("idempotency key was used before for a different request")]
    IdempotencyConflict,
    #[error("{field}: {value} is outside 0..={max} micro-credits, the regional store's range", max = REGION_MICROS_MAX)]
    OutOfRange { field: &'static str, value: Credits },
    #[error("the account's pool would exceed the regional store's range (pool {pool})")]
    PoolFull { pool: Credits },
    #[error("hold already exists")]
    HoldExists,
    #[error("too many lease entries: {count}, at most {max}", max = LEASE_SETTLE_ENTRIES_MAX)]
    TooManyEntries { count: usize },
    #[error("redis: {0}")]
    Redis(String),
    #[error("unreadable data from the store: {0}")]
    Corrupt(String),
}

/// Checks that an amount fits the regional store's exact range.
pub fn check_amount(field: &'static str, value: Credits) -> Result<(), RegionError> {
    if value.is_negative() || value.micros() > REGION_MICROS_MAX {
        return Err(RegionError::OutOfRange { field, value });
    }
    Ok(())
}

/// How an account's decisions are made by default (a request may override it).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EnforcementMode {
    /// One atomic call on the regional store per decision.
    #[default]
    Strict,
    /// Decisions from the edge's in-memory lease, flushed to the region every few milliseconds.
    Cached,
}

/// What the authority publishes about an account into every region: what an edge needs to
/// price and decide, and the balance as the ledger last saw it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct AccountSummary {
    pub account: AccountId,
    pub created_at: Timestamp,
    pub plan: Option<tollgate_core::PlanId>,
    pub mode: EnforcementMode,
    /// The account's contracts, periods never overlapping; pricing uses the one active at the
    /// decision's time.
    #[serde(default)]
    pub contracts: Vec<tollgate_core::Contract>,
    /// The ledger's balance when this summary was published.
    pub balance: Credits,
    pub overdraft_limit: Credits,
    /// Features with a token bucket in the regional store; edges decide these in strict mode so
    /// the bucket stays exact across edges.
    #[serde(default)]
    pub rate_limited: std::collections::BTreeSet<FeatureKey>,
    pub published_at: Timestamp,
    /// The account's credits this region does not hold: what the ledger says remains of each
    /// open grant less what this region holds of it or has spent without the ledger knowing
    /// yet. Neither this region's decisions nor their reconciliation change it (both move a
    /// grant's remainder and this region's share of it together), so an edge adds it to what
    /// the region holds to tell the account's balance. Grouped by terms, so an edge counts only
    /// what is effective and unexpired at the moment it answers.
    #[serde(default)]
    pub outside: Vec<OutsideCredits>,
    /// The ledger's debt plus the overdraft room this region was given and has not given back
    /// nor had reconciled: the account's debt as this region sees it is this less the room the
    /// region has left (`od_limit − od_used`). Invariant under this region's own decisions
    /// and their reconciliation, like `outside`.
    #[serde(default)]
    pub debt_basis: Credits,
    /// The region's move count for the account ([`AccountView::moves`]) when this summary was
    /// published, stamped by the region store (not part of the published document). `outside`
    /// and `debt_basis` match the region's figures read at the same count; an edge that reads
    /// another count with a decision reads the summary again.
    #[serde(default, skip_serializing)]
    pub region_moves: u64,
}

/// Credits of one account's grants sharing the same terms, held outside one region (by the
/// authority or by other regions).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct OutsideCredits {
    pub amount: Credits,
    pub effective_at: Timestamp,
    pub expires_at: Option<Timestamp>,
    pub scope: tollgate_core::Scope,
}

impl OutsideCredits {
    /// Whether these credits can pay at `at` (for `feature`, when given).
    pub fn counts_at(&self, at: Timestamp, feature: Option<&FeatureKey>) -> bool {
        self.effective_at <= at
            && self.expires_at.is_none_or(|end| at < end)
            && feature.is_none_or(|f| self.scope.covers(f))
    }
}

impl AccountSummary {
    /// The contract in force at `at`, if any.
    pub fn contract_at(&self, at: Timestamp) -> Option<&tollgate_core::Contract> {
        self.contracts.iter().find(|c| c.is_active_at(at))
    }

    /// The credits outside this region that can pay at `at` (for `feature`, when given).
    pub fn outside_at(&self, at: Timestamp, feature: Option<&FeatureKey>) -> Credits {
        Credits::checked_sum(
            self.outside
                .iter()
                .filter(|o| o.counts_at(at, feature))
                .map(|o| o.amount),
        )
        .unwrap_or(Credits::MAX)
    }
}

/// A change notice: what to reload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    PriceBook,
    Account(AccountId),
    /// An edge of the region could not pay a spend that credits out on leases would cover:
    /// every edge holding a lease on the account flushes it and gives it back.
    Recall(AccountId),
}

/// A price book as published, with a generation that grows with every publication.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PublishedPriceBook {
    pub generation: u64,
    pub book: tollgate_core::PriceBook,
}

/// A bucket must refill (amount > 0) and hold at least one credit's worth of micro-credits.
pub(crate) fn check_rate_limit(limit: &RateLimit) -> Result<(), RegionError> {
    check_amount("rate_limit.amount", limit.amount)?;
    check_amount("rate_limit.burst", limit.burst)?;
    if !limit.amount.is_positive() {
        return Err(RegionError::OutOfRange {
            field: "rate_limit.amount",
            value: limit.amount,
        });
    }
    if !limit.burst.is_positive() {
        return Err(RegionError::OutOfRange {
            field: "rate_limit.burst",
            value: limit.burst,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::usage_id_millis;

    #[test]
    fn a_usage_id_starts_with_its_append_time() {
        assert_eq!(usage_id_millis("1700000000123-4"), Some(1_700_000_000_123));
        assert_eq!(usage_id_millis("17"), Some(17));
        assert_eq!(usage_id_millis("x-1"), None);
        assert_eq!(usage_id_millis("-5-1"), None);
    }
}
