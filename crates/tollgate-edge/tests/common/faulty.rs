//! A regional store wrapper that loses replies and fails calls on demand.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

use tollgate_core::{AccountId, Credits, FeatureKey, GrantId, IdempotencyKey, LeaseId, Timestamp};
use tollgate_region::{
    AccountSummary, AccountView, AuthorizeCommand, AuthorizeOutcome, CaptureCommand,
    CaptureOutcome, Change, DebitCommand, DebitOutcome, Lease, LeaseRequest, LeaseSettlement,
    PublishedPriceBook, RateLimit, RegionError, RegionStore, ReleaseCommand, ReleaseOutcome,
    ReverseCommand, ReverseOutcome, SegmentInstalled, SegmentSpec, SettleOutcome, TakenBack,
    UsageId, UsageRecord,
};

type Result<T> = std::result::Result<T, RegionError>;

/// What the wrapper does with the next strict debits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DebitFault {
    /// Passed to the store.
    None,
    /// Answered with an error without reaching the store, as while it is down.
    Fail,
    /// The next one is applied but answered with an error, as a reply lost on the way back;
    /// then `None`.
    LoseNextReply,
}

/// A regional store that can lose replies and fail calls on demand. Its next settlement, once
/// armed, is applied but answered with an error, as a reply lost on the way back (or a timeout
/// after the script ran) would be; its strict debits follow [`DebitFault`].
pub struct FaultyStore<S> {
    inner: S,
    armed: AtomicBool,
    debits: Mutex<DebitFault>,
    debit_calls: AtomicU64,
    /// Every decision and lease call fails, as while the region does not answer.
    down: AtomicBool,
    /// Settlements fail without reaching the store (the rest passes), as while Redis is slow.
    settlements_fail: AtomicBool,
    /// The next settlement waits here before it reaches the store (see [`SettlementHeld`]).
    held: Mutex<Option<SettlementHeld>>,
}

/// A settlement stopped on its way to the store: `arrived` is notified when it gets there,
/// and it goes on once `release` is notified.
#[derive(Clone, Default)]
pub struct SettlementHeld {
    pub arrived: Arc<Notify>,
    pub release: Arc<Notify>,
}

impl<S: RegionStore> FaultyStore<S> {
    pub fn new(inner: S) -> Self {
        FaultyStore {
            inner,
            armed: AtomicBool::new(false),
            debits: Mutex::new(DebitFault::None),
            debit_calls: AtomicU64::new(0),
            down: AtomicBool::new(false),
            settlements_fail: AtomicBool::new(false),
            held: Mutex::new(None),
        }
    }

    /// Stops the next settlement before it reaches the store, until released.
    pub fn hold_next_settlement(&self) -> SettlementHeld {
        let held = SettlementHeld::default();
        *self.held.lock().unwrap() = Some(held.clone());
        held
    }

    /// While `down`, every strict decision, lease call (take, settle, return) and view fails
    /// without reaching the store. Published configuration (price book, account summaries)
    /// still reads, so a test sees the lease's deadline and not a catalogue miss.
    pub fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
    }

    /// While set, settlements fail without reaching the store; everything else passes.
    pub fn fail_settlements(&self, fail: bool) {
        self.settlements_fail.store(fail, Ordering::SeqCst);
    }

    fn check_up(&self) -> Result<()> {
        if self.down.load(Ordering::SeqCst) {
            return Err(RegionError::Redis("region unreachable (simulated)".into()));
        }
        Ok(())
    }

    pub fn lose_next_reply(&self) {
        self.armed.store(true, Ordering::SeqCst);
    }

    pub fn debits(&self, fault: DebitFault) {
        *self.debits.lock().unwrap() = fault;
    }

    /// Strict debits asked of this store so far (failed ones included).
    pub fn debit_calls(&self) -> u64 {
        self.debit_calls.load(Ordering::SeqCst)
    }
}

impl<S: RegionStore> RegionStore for FaultyStore<S> {
    fn retain_ms(&self) -> i64 {
        self.inner.retain_ms()
    }

    async fn settle_lease(&self, settlement: &LeaseSettlement) -> Result<SettleOutcome> {
        let held = self.held.lock().unwrap().take();
        if let Some(held) = held {
            held.arrived.notify_one();
            held.release.notified().await;
        }
        self.check_up()?;
        if self.settlements_fail.load(Ordering::SeqCst) {
            return Err(RegionError::Redis("settlement failed (simulated)".into()));
        }
        let outcome = self.inner.settle_lease(settlement).await?;
        if self.armed.swap(false, Ordering::SeqCst) {
            return Err(RegionError::Redis("settle reply lost (simulated)".into()));
        }
        Ok(outcome)
    }

    async fn install_segment(
        &self,
        account: &AccountId,
        key: &IdempotencyKey,
        segment: &SegmentSpec,
        now: Timestamp,
    ) -> Result<SegmentInstalled> {
        self.inner.install_segment(account, key, segment, now).await
    }

    async fn take_back(
        &self,
        account: &AccountId,
        key: &IdempotencyKey,
        grant_id: &GrantId,
        amount: Credits,
        reconciled: Option<u64>,
        now: Timestamp,
    ) -> Result<TakenBack> {
        self.inner
            .take_back(account, key, grant_id, amount, reconciled, now)
            .await
    }

    async fn set_overdraft_limit(
        &self,
        account: &AccountId,
        limit: Credits,
        now: Timestamp,
    ) -> Result<()> {
        self.inner.set_overdraft_limit(account, limit, now).await
    }

    async fn set_rate_limit(
        &self,
        account: &AccountId,
        feature: &FeatureKey,
        limit: Option<RateLimit>,
        now: Timestamp,
    ) -> Result<()> {
        self.inner
            .set_rate_limit(account, feature, limit, now)
            .await
    }

    async fn debit(&self, command: &DebitCommand) -> Result<DebitOutcome> {
        self.debit_calls.fetch_add(1, Ordering::SeqCst);
        self.check_up()?;
        let fault = *self.debits.lock().unwrap();
        match fault {
            DebitFault::None => self.inner.debit(command).await,
            DebitFault::Fail => Err(RegionError::Redis("store down (simulated)".into())),
            DebitFault::LoseNextReply => {
                let outcome = self.inner.debit(command).await?;
                *self.debits.lock().unwrap() = DebitFault::None;
                drop(outcome);
                Err(RegionError::Redis("debit reply lost (simulated)".into()))
            }
        }
    }

    async fn authorize(&self, command: &AuthorizeCommand) -> Result<AuthorizeOutcome> {
        self.check_up()?;
        self.inner.authorize(command).await
    }

    async fn capture(&self, command: &CaptureCommand) -> Result<CaptureOutcome> {
        self.check_up()?;
        self.inner.capture(command).await
    }

    async fn release(&self, command: &ReleaseCommand) -> Result<ReleaseOutcome> {
        self.check_up()?;
        self.inner.release(command).await
    }

    async fn reverse(&self, command: &ReverseCommand) -> Result<ReverseOutcome> {
        self.check_up()?;
        self.inner.reverse(command).await
    }

    async fn take_lease(&self, request: &LeaseRequest) -> Result<Lease> {
        self.check_up()?;
        self.inner.take_lease(request).await
    }

    async fn return_lease(
        &self,
        account: &AccountId,
        lease_id: &LeaseId,
        now: Timestamp,
    ) -> Result<Credits> {
        self.check_up()?;
        self.inner.return_lease(account, lease_id, now).await
    }

    async fn view(&self, account: &AccountId, now: Timestamp) -> Result<AccountView> {
        self.check_up()?;
        self.inner.view(account, now).await
    }

    async fn create_usage_group(&self, group: &str) -> Result<()> {
        self.inner.create_usage_group(group).await
    }

    async fn read_usage(
        &self,
        group: &str,
        consumer: &str,
        max: usize,
    ) -> Result<Vec<UsageRecord>> {
        self.inner.read_usage(group, consumer, max).await
    }

    async fn ack_usage(&self, group: &str, ids: &[UsageId]) -> Result<u64> {
        self.inner.ack_usage(group, ids).await
    }

    async fn publish_price_book(&self, book: &tollgate_core::PriceBook) -> Result<u64> {
        self.inner.publish_price_book(book).await
    }

    async fn price_book_generation(&self) -> Result<u64> {
        self.inner.price_book_generation().await
    }

    async fn load_price_book(&self) -> Result<Option<PublishedPriceBook>> {
        self.inner.load_price_book().await
    }

    async fn publish_account(&self, summary: &AccountSummary) -> Result<()> {
        self.inner.publish_account(summary).await
    }

    async fn account_summary(&self, account: &AccountId) -> Result<Option<AccountSummary>> {
        self.inner.account_summary(account).await
    }

    async fn recall_leases(&self, account: &AccountId) -> Result<()> {
        self.inner.recall_leases(account).await
    }

    async fn watch_changes(&self) -> Result<tokio::sync::mpsc::Receiver<Change>> {
        self.inner.watch_changes().await
    }
}
