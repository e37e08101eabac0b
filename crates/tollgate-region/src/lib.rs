//! The regional store: an account's allocation segments in one region, and every decision that
//! spends them, made atomically. Two implementations with the same semantics:
//! [`RedisRegionStore`] (each mutation one Lua script, production) and [`MemoryRegionStore`]
//! (the embedded single node). [`conformance`] is the one suite both pass.
//!
//! Owns: segments, overdraft room, holds, edge leases, token buckets, idempotency keys and the
//! usage stream of one region. Depends on `tollgate-core` for the vocabulary only; it must not
//! depend on services, the ledger or the wire contract.

use std::future::Future;

use tollgate_core::{AccountId, Credits, FeatureKey, GrantId, IdempotencyKey, LeaseId, Timestamp};

pub mod conformance;
mod memory;
mod redis_store;
mod types;

pub use memory::MemoryRegionStore;
pub use redis_store::RedisRegionStore;
pub use types::*;

type Result<T> = std::result::Result<T, RegionError>;

/// Every operation takes the caller's `now`: the store never reads a clock of its own, so both
/// implementations decide the same way and tests control time.
pub trait RegionStore: Send + Sync + 'static {
    /// How long idempotency keys are remembered (ms): a call replayed within it moves nothing.
    fn retain_ms(&self) -> i64;

    /// Installs a segment, or tops it up (its metadata is replaced by the new one).
    fn install_segment(
        &self,
        account: &AccountId,
        key: &IdempotencyKey,
        segment: &SegmentSpec,
        now: Timestamp,
    ) -> impl Future<Output = Result<SegmentInstalled>> + Send;

    /// Takes back up to `amount` of a segment's unspent, unheld, unleased credits. With
    /// `reconciled` (the highest [`UsageRecord::seq`] of the account the caller has reconciled),
    /// nothing is taken while the account has usage records beyond it, in the same atomic step.
    fn take_back(
        &self,
        account: &AccountId,
        key: &IdempotencyKey,
        grant_id: &GrantId,
        amount: Credits,
        reconciled: Option<u64>,
        now: Timestamp,
    ) -> impl Future<Output = Result<TakenBack>> + Send;

    /// Sets how far into overdraft this region may take the account.
    fn set_overdraft_limit(
        &self,
        account: &AccountId,
        limit: Credits,
        now: Timestamp,
    ) -> impl Future<Output = Result<()>> + Send;

    /// Sets or removes a feature's token bucket.
    fn set_rate_limit(
        &self,
        account: &AccountId,
        feature: &FeatureKey,
        limit: Option<RateLimit>,
        now: Timestamp,
    ) -> impl Future<Output = Result<()>> + Send;

    fn debit(&self, command: &DebitCommand) -> impl Future<Output = Result<DebitOutcome>> + Send;
    fn authorize(
        &self,
        command: &AuthorizeCommand,
    ) -> impl Future<Output = Result<AuthorizeOutcome>> + Send;
    fn capture(
        &self,
        command: &CaptureCommand,
    ) -> impl Future<Output = Result<CaptureOutcome>> + Send;
    fn release(
        &self,
        command: &ReleaseCommand,
    ) -> impl Future<Output = Result<ReleaseOutcome>> + Send;
    /// Undoes a debit (strict or settled from a lease) within the window.
    fn reverse(
        &self,
        command: &ReverseCommand,
    ) -> impl Future<Output = Result<ReverseOutcome>> + Send;

    fn take_lease(&self, request: &LeaseRequest) -> impl Future<Output = Result<Lease>> + Send;
    fn settle_lease(
        &self,
        settlement: &LeaseSettlement,
    ) -> impl Future<Output = Result<SettleOutcome>> + Send;
    /// Gives what is left of a lease back to the segments; returns how much.
    fn return_lease(
        &self,
        account: &AccountId,
        lease_id: &LeaseId,
        now: Timestamp,
    ) -> impl Future<Output = Result<Credits>> + Send;

    /// The account in this region, after expired holds and leases have given their credits back.
    fn view(
        &self,
        account: &AccountId,
        now: Timestamp,
    ) -> impl Future<Output = Result<AccountView>> + Send;

    /// Creates the consumer group (idempotent). One group per stream: acknowledged records are
    /// deleted from the stream.
    fn create_usage_group(&self, group: &str) -> impl Future<Output = Result<()>> + Send;
    /// Records delivered to `consumer` but not yet acknowledged come first (after a crash they
    /// are delivered again); then new records. At most `max`.
    fn read_usage(
        &self,
        group: &str,
        consumer: &str,
        max: usize,
    ) -> impl Future<Output = Result<Vec<UsageRecord>>> + Send;
    /// [`RegionStore::read_usage`], saying whether the read reached the stream's end (see
    /// [`UsageRead::at_end`]). The default only knows it from an empty read (for wrappers and
    /// test doubles: a store that wraps another should forward the call).
    fn read_usage_to_end(
        &self,
        group: &str,
        consumer: &str,
        max: usize,
    ) -> impl Future<Output = Result<UsageRead>> + Send {
        let read = self.read_usage(group, consumer, max);
        async move {
            let records = read.await?;
            let at_end = records.is_empty();
            Ok(UsageRead { records, at_end })
        }
    }
    /// Acknowledges records the caller has made durable; returns how many were pending.
    fn ack_usage(&self, group: &str, ids: &[UsageId]) -> impl Future<Output = Result<u64>> + Send;
    /// The records in the usage stream and when the oldest was appended, for monitoring.
    /// `None`: this store does not say (the default, for wrappers and test doubles; a store
    /// that wraps another should forward the call).
    fn usage_backlog(&self) -> impl Future<Output = Result<Option<UsageBacklog>>> + Send {
        std::future::ready(Ok(None))
    }

    /// Publishes a whole price book (readers never see part of one) and sends a change notice.
    /// Returns the new generation.
    fn publish_price_book(
        &self,
        book: &tollgate_core::PriceBook,
    ) -> impl Future<Output = Result<u64>> + Send;
    /// The generation of the price book last published (0: none); cheap, for polling.
    fn price_book_generation(&self) -> impl Future<Output = Result<u64>> + Send;
    /// The price book last published, if any.
    fn load_price_book(&self) -> impl Future<Output = Result<Option<PublishedPriceBook>>> + Send;
    /// Publishes an account's summary and sends a change notice.
    fn publish_account(&self, summary: &AccountSummary) -> impl Future<Output = Result<()>> + Send;
    fn account_summary(
        &self,
        account: &AccountId,
    ) -> impl Future<Output = Result<Option<AccountSummary>>> + Send;
    /// Asks every edge holding a lease on `account` to give it back (a [`Change::Recall`]
    /// notice). Only a notice: the caller watches the account's `leased` figure.
    fn recall_leases(&self, account: &AccountId) -> impl Future<Output = Result<()>> + Send;
    /// Change notices from now on. Notices may be lost (a reconnect); readers also poll.
    fn watch_changes(
        &self,
    ) -> impl Future<Output = Result<tokio::sync::mpsc::Receiver<Change>>> + Send;
}

/// Capacity of a change-notice channel; a slow reader loses notices, never blocks publishers.
pub const CHANGE_CHANNEL_CAPACITY: usize = 1_024;
/// Largest published document (price book or summary), in bytes.
pub const PUBLISHED_BYTES_MAX: usize = 16 * 1024 * 1024;

// ---- Fingerprints -----------------------------------------------------------------------------
// An idempotency key remembers the fingerprint of its request; a replay must match it. Both
// stores build fingerprints here, so they can never disagree on what "the same request" is.

pub(crate) fn install_fingerprint(segment: &SegmentSpec) -> String {
    format!(
        "install|{}|{}|{}|{}|{}|{}",
        segment.grant_id,
        segment.amount.micros(),
        segment.priority,
        segment
            .expires_at
            .map(|t| t.millis().to_string())
            .unwrap_or_default(),
        segment.effective_at.millis(),
        scope_text(&segment.scope)
    )
}

/// Fingerprints the hold's TTL, not its expiry: a retry is sent later, so its expiry is later,
/// and it must still name the first hold. The actor comes last so its text cannot be confused
/// with the fields before it.
pub(crate) fn authorize_fingerprint(command: &AuthorizeCommand) -> String {
    let ttl_ms = command
        .expires_at
        .millis()
        .saturating_sub(command.now.millis());
    let actor = command.actor.as_ref().map_or("", |actor| actor.as_str());
    format!(
        "authorize|{}|{}|{}|{ttl_ms}|{actor}",
        command.hold_id,
        command.feature,
        requested(command.cost, &command.price),
    )
}

/// What the caller asked to spend, as fingerprinted: a quantity as `q<units>`, whatever it was
/// priced at (a retry reaching a node with a newer price book version is the same request);
/// an explicit cost as its micro-credits with the price fields it was recorded with, as before
/// quantities were fingerprinted (version 0, so they never vary).
fn requested(cost: Credits, price: &PriceTag) -> String {
    match price.quantity {
        Some(quantity) => format!("q{quantity}"),
        None => format!(
            "{}|{}|{}",
            cost.micros(),
            price.version,
            price.rule.as_str()
        ),
    }
}

pub(crate) fn take_back_fingerprint(
    grant_id: &GrantId,
    amount: Credits,
    reconciled: Option<u64>,
) -> String {
    let reconciled = reconciled.map(|n| n.to_string()).unwrap_or_default();
    format!("take_back|{grant_id}|{}|{reconciled}", amount.micros())
}

pub(crate) fn release_fingerprint(hold_id: &tollgate_core::HoldId) -> String {
    format!("release|{hold_id}")
}

pub(crate) fn reverse_fingerprint(debit_key: &IdempotencyKey) -> String {
    format!("reverse|{debit_key}")
}

pub(crate) fn lease_fingerprint(request: &LeaseRequest) -> String {
    format!("lease|{}|{}", request.lease_id, request.amount.micros())
}

/// The fingerprint of a debit; a lease entry with the same key and fingerprint is the same
/// request, so a strict-mode replay of a key first charged from a lease is a replay. The feature
/// is its second `|`-separated field (`reverse.lua` reads it). Public because an edge deciding
/// from a lease remembers its decisions by the same fingerprint and derives keys from it.
pub fn debit_fingerprint(feature: &FeatureKey, cost: Credits, price: &PriceTag) -> String {
    format!("debit|{feature}|{}", requested(cost, price))
}

/// Hex digits of the SHA-1 tag that ends a derived key.
pub const DERIVED_KEY_TAG_HEX: usize = 16;
/// Derived keys a settled entry tries in turn, after its own, before it is rejected. A further
/// one is needed only when a client reused a key with yet another request, or sent a derived
/// key as its own.
pub const DERIVED_KEYS_MAX: usize = 3;

/// The key a decision settled from a lease is charged under when its own key is remembered for
/// a different request: `<key>~<first 16 hex digits of sha1(fingerprint "\n" key)>`, the key
/// cut so that the whole fits [`IDEMPOTENCY_KEY_LEN_MAX`](tollgate_core::ids::IDEMPOTENCY_KEY_LEN_MAX).
/// The key is in the hash, so two long keys cut to the same prefix still differ. Deterministic,
/// so a settlement sent again finds its first charge. `lease_settle.lua` has the same function.
pub fn derived_key(key: &IdempotencyKey, fingerprint: &str) -> IdempotencyKey {
    // The same SHA-1 Redis computes for `redis.sha1hex`: the redis crate's script digest (it
    // hashes the text as given), which spares a dependency for these few bytes.
    let digest = redis::Script::new(&format!("{fingerprint}\n{key}"))
        .get_hash()
        .to_string();
    let tag = &digest[..DERIVED_KEY_TAG_HEX.min(digest.len())];
    let kept = tollgate_core::ids::IDEMPOTENCY_KEY_LEN_MAX - 1 - DERIVED_KEY_TAG_HEX;
    // Keys are ASCII, so any byte index is a character boundary.
    let head = key.as_str().get(..kept).unwrap_or(key.as_str());
    IdempotencyKey::new(format!("{head}~{tag}"))
        .unwrap_or_else(|_| unreachable!("a cut key, '~' and hex digits make a valid key"))
}

pub(crate) fn capture_fingerprint(command: &CaptureCommand) -> String {
    match command.amount {
        Some(amount) => format!("capture|{}|{}", command.hold_id, amount.micros()),
        None => format!("capture|{}|all", command.hold_id),
    }
}

pub(crate) fn scope_text(scope: &tollgate_core::Scope) -> String {
    match scope {
        tollgate_core::Scope::All => "*".to_string(),
        tollgate_core::Scope::Features(features) => features
            .iter()
            .map(FeatureKey::as_str)
            .collect::<Vec<_>>()
            .join(","),
    }
}

pub(crate) fn parse_scope(text: &str) -> std::result::Result<tollgate_core::Scope, RegionError> {
    if text == "*" {
        return Ok(tollgate_core::Scope::All);
    }
    text.split(',')
        .map(|feature| {
            FeatureKey::new(feature)
                .map_err(|e| RegionError::Corrupt(format!("scope {text:?}: {e}")))
        })
        .collect::<std::result::Result<_, _>>()
        .map(tollgate_core::Scope::Features)
}

pub(crate) fn price_rule_from(
    text: &str,
) -> std::result::Result<tollgate_core::PriceRule, RegionError> {
    use tollgate_core::PriceRule;
    [
        PriceRule::AccountContract,
        PriceRule::PlanRegion,
        PriceRule::Plan,
        PriceRule::Region,
        PriceRule::Default,
    ]
    .into_iter()
    .find(|rule| rule.as_str() == text)
    .ok_or_else(|| RegionError::Corrupt(format!("price rule {text:?}")))
}
