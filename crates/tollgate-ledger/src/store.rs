//! The `LedgerStore` trait: what the authority asks of the durable ledger.

use async_trait::async_trait;
use tollgate_core::command::{
    Adjust, CloseGrant, ClosePeriod, CreateAccount, IssueGrant, Refund, SettleDebt, UpdateAccount,
    UsageDebit,
};
use tollgate_core::{AccountId, Grant, GrantId, Timestamp};

use crate::error::LedgerError;
use crate::model::{
    AccountSnapshot, DebitQuery, DebitRow, Entry, EntryFilter, GrantRecord, Outcome, Page,
    PageRequest, UsageOutcome, VerifyReport,
};

/// The durable ledger. Every mutation runs in one transaction that locks the account, applies
/// the core's rules to the account's stored state, appends hash-chained entries, and updates
/// the materialized balance and grant remainders — all or nothing.
///
/// Admin mutations carry an idempotency key: the same key with the same command returns the
/// first result (`replayed: true`) and moves nothing; the same key with a different command is
/// [`LedgerError::IdempotencyConflict`]. `now` is the time the mutation is recorded at.
#[async_trait]
pub trait LedgerStore: Send + Sync {
    async fn create_account(
        &self,
        command: CreateAccount,
        now: Timestamp,
    ) -> Result<AccountSnapshot, LedgerError>;

    /// Changes the account's overdraft limit and metadata; no ledger entry (the limit bounds
    /// future spending, it moves no credits). Idempotent by key like every admin mutation.
    async fn update_account(
        &self,
        command: UpdateAccount,
        now: Timestamp,
    ) -> Result<AccountSnapshot, LedgerError>;

    /// Forgets up to `limit` idempotency records made before `before` (their retention is
    /// over); returns how many. Entries, debits and their own ids are never touched.
    async fn prune_idempotency(&self, before: Timestamp, limit: u32) -> Result<u64, LedgerError>;

    /// The account with its materialized balance: one row, whatever its history.
    async fn account(&self, account: &AccountId) -> Result<AccountSnapshot, LedgerError>;

    async fn issue_grant(
        &self,
        command: IssueGrant,
        now: Timestamp,
    ) -> Result<Outcome, LedgerError>;

    /// Voids or expires what is left of a grant.
    async fn close_grant(
        &self,
        command: CloseGrant,
        now: Timestamp,
    ) -> Result<Outcome, LedgerError>;

    async fn refund(&self, command: Refund, now: Timestamp) -> Result<Outcome, LedgerError>;

    async fn adjust(&self, command: Adjust, now: Timestamp) -> Result<Outcome, LedgerError>;

    /// Settles debt from one grant (a `settle` entry), for debt whose usage arrived after the
    /// grant was issued. With no debt left, or nothing left in the grant, it settles nothing
    /// and the receipt has no movements; a grant closed or not in effect is refused.
    async fn settle_debt(
        &self,
        command: SettleDebt,
        now: Timestamp,
    ) -> Result<Outcome, LedgerError>;

    /// Applies region-decided debits, in one transaction. A debit id seen before is a
    /// [`UsageOutcome::Duplicate`] and moves nothing, so replaying a batch is safe.
    async fn apply_usage(
        &self,
        batch: Vec<UsageDebit>,
        now: Timestamp,
    ) -> Result<Vec<UsageOutcome>, LedgerError>;

    /// The account's grants in id order, a page at a time.
    async fn grants(
        &self,
        account: &AccountId,
        open_only: bool,
        page: PageRequest,
    ) -> Result<Page<GrantRecord>, LedgerError>;

    /// The account's open grants that still hold credits (what can still be spent or
    /// allocated) in burn-down order ([`tollgate_core::burn_order`]), the first `limit` of them.
    /// An account holding more than [`crate::OPEN_GRANTS_MAX`] is an error when the read
    /// reaches past that many.
    async fn grants_with_credits(
        &self,
        account: &AccountId,
        limit: usize,
    ) -> Result<Vec<Grant>, LedgerError>;

    /// [`LedgerStore::grants_with_credits`] with each grant's record (its metadata and when it
    /// was issued).
    async fn grant_records_with_credits(
        &self,
        account: &AccountId,
        limit: usize,
    ) -> Result<Vec<GrantRecord>, LedgerError>;

    /// The account's entries matching `filter`, in sequence order, a page at a time.
    async fn entries(
        &self,
        filter: &EntryFilter,
        page: PageRequest,
    ) -> Result<Page<Entry>, LedgerError>;

    /// Checks the hash chains, the balance equation, the materialized columns and every
    /// grant's `0 <= remaining <= amount`, for one account or for all.
    async fn verify(&self, account: Option<&AccountId>) -> Result<VerifyReport, LedgerError>;

    /// Closes a period of a recurring grant (rollover and expiry), idempotent by key.
    async fn close_period(
        &self,
        command: ClosePeriod,
        now: Timestamp,
    ) -> Result<Outcome, LedgerError>;

    /// Every account in id order, a page at a time.
    async fn list_accounts(&self, page: PageRequest) -> Result<Page<AccountSnapshot>, LedgerError>;

    /// Open grants of every account whose `expires_at` is at or before `before`, soonest
    /// first, at most `limit` (at most [`crate::PAGE_SIZE_MAX`]).
    async fn grants_expiring(
        &self,
        before: Timestamp,
        limit: u32,
    ) -> Result<Vec<GrantRecord>, LedgerError>;

    /// Reconciled debits with their event time in `[from, until)`, for one account or all,
    /// in (account, debit id) order, a page at a time.
    async fn debits(
        &self,
        query: &DebitQuery,
        page: PageRequest,
    ) -> Result<Page<DebitRow>, LedgerError>;

    /// Entries of every account (or one) with their event time in `[from, until)`, in
    /// (account, seq) order, a page at a time.
    async fn entries_between(
        &self,
        query: &DebitQuery,
        page: PageRequest,
    ) -> Result<Page<Entry>, LedgerError>;

    /// One grant of the account whatever its state, or `None` when the account has no grant
    /// with that id (an unknown account is [`LedgerError::UnknownAccount`]).
    async fn grant(
        &self,
        account: &AccountId,
        grant: &GrantId,
    ) -> Result<Option<GrantRecord>, LedgerError>;
}
