//! A regional store with faults: the in-memory store (the same semantics as the Redis scripts)
//! behind a switch that the simulator flips.
//!
//! - **Down** (a Redis restart): every call fails as a refused connection would. The state
//!   survives (AOF with `appendfsync always`), so nothing decided before is lost; edges keep
//!   their unflushed decisions and retry.
//! - **Install faults** (authority → region messages): the next install is lost before it
//!   arrives, applied with its answer lost, or delivered twice (the second delivery must be a
//!   replay that moves nothing).
//! - **Acknowledgement lost**: the next `ack_usage` fails before it reaches the store, so the
//!   records are delivered again.
//! - **Settle reply lost**: the next `settle_lease` is applied and its answer lost; the edge
//!   sends the same decisions again, which must be recorded once and credited back never.

use std::sync::Mutex;

use tollgate_core::{AccountId, Credits, FeatureKey, GrantId, IdempotencyKey, LeaseId, Timestamp};
use tollgate_region::{
    AccountSummary, AccountView, AuthorizeCommand, AuthorizeOutcome, CaptureCommand,
    CaptureOutcome, Change, DebitCommand, DebitOutcome, Lease, LeaseRequest, LeaseSettlement,
    MemoryRegionStore, PublishedPriceBook, RateLimit, RegionError, RegionStore, ReleaseCommand,
    ReleaseOutcome, ReverseCommand, ReverseOutcome, SegmentInstalled, SegmentSpec, SettleOutcome,
    TakenBack, UsageId, UsageRecord,
};

type Result<T> = std::result::Result<T, RegionError>;

/// What happens to the next install message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InstallFault {
    /// Lost on the way: not applied, the sender sees an error.
    Lost,
    /// Applied, but the answer is lost: the sender sees an error.
    ReplyLost,
    /// Delivered twice: the second delivery must be a no-op.
    Duplicated,
}

#[derive(Default)]
struct Switches {
    down: bool,
    install: Option<InstallFault>,
    ack_lost: bool,
    settle_reply_lost: bool,
}

pub struct FaultyRegion {
    inner: MemoryRegionStore,
    switches: Mutex<Switches>,
    /// What a fault revealed that must never happen (checked by the simulator after each step).
    violations: Mutex<Vec<String>>,
}

impl FaultyRegion {
    pub fn new(retain_ms: i64) -> Self {
        FaultyRegion {
            inner: MemoryRegionStore::new(retain_ms),
            switches: Mutex::new(Switches::default()),
            violations: Mutex::new(Vec::new()),
        }
    }

    fn switches(&self) -> std::sync::MutexGuard<'_, Switches> {
        self.switches.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn set_down(&self, down: bool) {
        self.switches().down = down;
    }

    pub fn is_down(&self) -> bool {
        self.switches().down
    }

    pub fn arm_install(&self, fault: InstallFault) {
        self.switches().install = Some(fault);
    }

    pub fn arm_ack_lost(&self) {
        self.switches().ack_lost = true;
    }

    pub fn arm_settle_reply_lost(&self) {
        self.switches().settle_reply_lost = true;
    }

    /// Whether a one-shot fault is still waiting for its message.
    pub fn armed(&self) -> bool {
        let s = self.switches();
        s.install.is_some() || s.ack_lost || s.settle_reply_lost
    }

    pub fn disarm(&self) {
        let mut s = self.switches();
        s.install = None;
        s.ack_lost = false;
        s.settle_reply_lost = false;
    }

    pub fn take_violations(&self) -> Vec<String> {
        std::mem::take(&mut *self.violations.lock().unwrap_or_else(|p| p.into_inner()))
    }

    fn up(&self) -> Result<()> {
        if self.is_down() {
            Err(RegionError::Redis(
                "connection refused (simulated restart)".into(),
            ))
        } else {
            Ok(())
        }
    }
}

impl RegionStore for FaultyRegion {
    fn retain_ms(&self) -> i64 {
        self.inner.retain_ms()
    }

    async fn install_segment(
        &self,
        account: &AccountId,
        key: &IdempotencyKey,
        segment: &SegmentSpec,
        now: Timestamp,
    ) -> Result<SegmentInstalled> {
        self.up()?;
        let fault = self.switches().install.take();
        match fault {
            None => self.inner.install_segment(account, key, segment, now).await,
            Some(InstallFault::Lost) => Err(RegionError::Redis(
                "install lost on the way (simulated)".into(),
            )),
            Some(InstallFault::ReplyLost) => {
                self.inner
                    .install_segment(account, key, segment, now)
                    .await?;
                Err(RegionError::Redis("install answer lost (simulated)".into()))
            }
            Some(InstallFault::Duplicated) => {
                let first = self
                    .inner
                    .install_segment(account, key, segment, now)
                    .await?;
                let second = self
                    .inner
                    .install_segment(account, key, segment, now)
                    .await?;
                if !second.replayed || second.pool != first.pool {
                    self.violations
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push(format!(
                            "a duplicated install of {} for {account} moved credits again: {first:?} then {second:?}",
                            segment.grant_id
                        ));
                }
                Ok(first)
            }
        }
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
        self.up()?;
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
        self.up()?;
        self.inner.set_overdraft_limit(account, limit, now).await
    }

    async fn set_rate_limit(
        &self,
        account: &AccountId,
        feature: &FeatureKey,
        limit: Option<RateLimit>,
        now: Timestamp,
    ) -> Result<()> {
        self.up()?;
        self.inner
            .set_rate_limit(account, feature, limit, now)
            .await
    }

    async fn debit(&self, command: &DebitCommand) -> Result<DebitOutcome> {
        self.up()?;
        self.inner.debit(command).await
    }

    async fn authorize(&self, command: &AuthorizeCommand) -> Result<AuthorizeOutcome> {
        self.up()?;
        self.inner.authorize(command).await
    }

    async fn capture(&self, command: &CaptureCommand) -> Result<CaptureOutcome> {
        self.up()?;
        self.inner.capture(command).await
    }

    async fn release(&self, command: &ReleaseCommand) -> Result<ReleaseOutcome> {
        self.up()?;
        self.inner.release(command).await
    }

    async fn reverse(&self, command: &ReverseCommand) -> Result<ReverseOutcome> {
        self.up()?;
        self.inner.reverse(command).await
    }

    async fn take_lease(&self, request: &LeaseRequest) -> Result<Lease> {
        self.up()?;
        self.inner.take_lease(request).await
    }

    async fn settle_lease(&self, settlement: &LeaseSettlement) -> Result<SettleOutcome> {
        self.up()?;
        let outcome = self.inner.settle_lease(settlement).await;
        if outcome.is_ok() && std::mem::take(&mut self.switches().settle_reply_lost) {
            return Err(RegionError::Redis("settle reply lost (simulated)".into()));
        }
        outcome
    }

    async fn return_lease(
        &self,
        account: &AccountId,
        lease_id: &LeaseId,
        now: Timestamp,
    ) -> Result<Credits> {
        self.up()?;
        self.inner.return_lease(account, lease_id, now).await
    }

    async fn view(&self, account: &AccountId, now: Timestamp) -> Result<AccountView> {
        self.up()?;
        self.inner.view(account, now).await
    }

    async fn create_usage_group(&self, group: &str) -> Result<()> {
        self.up()?;
        self.inner.create_usage_group(group).await
    }

    async fn read_usage(
        &self,
        group: &str,
        consumer: &str,
        max: usize,
    ) -> Result<Vec<UsageRecord>> {
        self.up()?;
        self.inner.read_usage(group, consumer, max).await
    }

    async fn ack_usage(&self, group: &str, ids: &[UsageId]) -> Result<u64> {
        self.up()?;
        if std::mem::take(&mut self.switches().ack_lost) {
            return Err(RegionError::Redis(
                "acknowledgement lost (simulated)".into(),
            ));
        }
        self.inner.ack_usage(group, ids).await
    }

    async fn publish_price_book(&self, book: &tollgate_core::PriceBook) -> Result<u64> {
        self.up()?;
        self.inner.publish_price_book(book).await
    }

    async fn price_book_generation(&self) -> Result<u64> {
        self.up()?;
        self.inner.price_book_generation().await
    }

    async fn load_price_book(&self) -> Result<Option<PublishedPriceBook>> {
        self.up()?;
        self.inner.load_price_book().await
    }

    async fn publish_account(&self, summary: &AccountSummary) -> Result<()> {
        self.up()?;
        self.inner.publish_account(summary).await
    }

    async fn account_summary(&self, account: &AccountId) -> Result<Option<AccountSummary>> {
        self.up()?;
        self.inner.account_summary(account).await
    }

    async fn recall_leases(&self, account: &AccountId) -> Result<()> {
        self.up()?;
        self.inner.recall_leases(account).await
    }

    async fn watch_changes(&self) -> Result<tokio::sync::mpsc::Receiver<Change>> {
        self.up()?;
        self.inner.watch_changes().await
    }
}
