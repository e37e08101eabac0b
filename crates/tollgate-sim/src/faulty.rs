//! A regional store with faults: the in-memory store (the same semantics as the Redis scripts)
//! behind switches that the simulator flips. One region's state and switches are shared by
//! handles: the authority uses the region's own, and each edge a handle of its own
//! ([`FaultyRegion::handle`]) that can be cut off alone.
//!
//! - **Down** (a Redis restart): every call fails as a refused connection would. The state
//!   survives (AOF with `appendfsync always`), so nothing decided before is lost; edges keep
//!   their unflushed decisions and retry.
//! - **Partitioned** (one edge's handle): that edge's calls fail as a refused connection,
//!   while the authority and the other edges reach the region; it heals later.
//! - **Install faults** (authority → region messages): the next install is lost before it
//!   arrives, applied with its answer lost, or delivered twice (the second delivery must be a
//!   replay that moves nothing).
//! - **Acknowledgement lost**: the next `ack_usage` fails before it reaches the store, so the
//!   records are delivered again.
//! - **Settle reply lost**: the next `settle_lease` is applied and its answer lost; the edge
//!   sends the same decisions again, which must be recorded once and credited back never.
//! - **Debit answer lost**: the next `debit` is applied and its answer lost; the edge sees an
//!   error, and the client retries under the same key.
//! - **Debit slower than the store timeout**: the next `debit` answers an error at once, as
//!   the edge's timeout would, and is applied only at the end of the next call that reaches
//!   the region (after that call's own effect), so a following call (the client's retry among
//!   them) may overtake it.
//! - **Settlement slower than the store timeout**: the same for the next `settle_lease`: the
//!   edge sees an error and keeps the decisions to send again; the late settlement arrives
//!   after the next call that reaches the region, before or after the edge's own resend. Both
//!   orders must record the decisions once and credit nothing back to the lease.
//!
//! A debit applied whose answer was lost is written down ([`AnswerLost`]) for the simulator:
//! it is in the region (and its usage stream) although no caller was told.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tollgate_core::{
    AccountId, Credits, Draw, FeatureKey, GrantId, IdempotencyKey, LeaseId, Timestamp,
};
use tollgate_region::{
    AccountSummary, AccountView, AuthorizeCommand, AuthorizeOutcome, CaptureCommand,
    CaptureOutcome, Change, DebitCommand, DebitOutcome, Lease, LeaseRequest, LeaseSettlement,
    MemoryRegionStore, PublishedPriceBook, RateLimit, RegionError, RegionStore, ReleaseCommand,
    ReleaseOutcome, ReverseCommand, ReverseOutcome, SegmentInstalled, SegmentSpec, SettleOutcome,
    TakenBack, UsageBacklog, UsageId, UsageRead, UsageRecord,
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

/// What happens to the next debit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DebitFault {
    /// Applied, its answer lost: the caller sees an error.
    AnswerLost,
    /// Slower than the edge's store timeout: the caller sees an error at once, and the debit is
    /// applied at the end of the next call that reaches the region.
    Slow,
}

/// A debit the region applied (a new charge, not a replay) whose answer no caller got.
#[derive(Clone, Debug)]
pub struct AnswerLost {
    pub account: AccountId,
    pub key: IdempotencyKey,
    pub feature: FeatureKey,
    pub cost: Credits,
    /// The debit's event time.
    pub at: Timestamp,
    pub draws: Vec<Draw>,
    pub overdraft: Credits,
}

#[derive(Default)]
struct Switches {
    down: bool,
    install: Option<InstallFault>,
    ack_lost: bool,
    settle_reply_lost: bool,
    debit: Option<DebitFault>,
    settle_slow: bool,
    /// A slow call on its way, applied at the end of the next call that reaches the region.
    deferred: Option<Deferred>,
}

/// A call slower than the caller's timeout, still on its way to the region.
enum Deferred {
    Debit(DebitCommand),
    Settle(LeaseSettlement),
}

/// One region: its store, its switches, and what the faults revealed.
struct Shared {
    inner: MemoryRegionStore,
    switches: Mutex<Switches>,
    /// What a fault revealed that must never happen (checked by the simulator after each step).
    violations: Mutex<Vec<String>>,
    answers_lost: Mutex<Vec<AnswerLost>>,
    /// Debit faults that fired (an edge's error they explain).
    debit_faults_fired: AtomicU64,
}

pub struct FaultyRegion {
    shared: Arc<Shared>,
    /// This handle is cut off from the region (an edge partitioned from its Redis).
    partitioned: AtomicBool,
}

impl FaultyRegion {
    pub fn new(retain_ms: i64) -> Self {
        FaultyRegion {
            shared: Arc::new(Shared {
                inner: MemoryRegionStore::new(retain_ms),
                switches: Mutex::new(Switches::default()),
                violations: Mutex::new(Vec::new()),
                answers_lost: Mutex::new(Vec::new()),
                debit_faults_fired: AtomicU64::new(0),
            }),
            partitioned: AtomicBool::new(false),
        }
    }

    /// Another way into the same region (an edge's connection), with a partition switch of
    /// its own.
    pub fn handle(&self) -> Arc<FaultyRegion> {
        Arc::new(FaultyRegion {
            shared: Arc::clone(&self.shared),
            partitioned: AtomicBool::new(false),
        })
    }

    fn inner(&self) -> &MemoryRegionStore {
        &self.shared.inner
    }

    fn switches(&self) -> std::sync::MutexGuard<'_, Switches> {
        self.shared
            .switches
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    pub fn set_down(&self, down: bool) {
        self.switches().down = down;
    }

    pub fn is_down(&self) -> bool {
        self.switches().down
    }

    pub fn set_partitioned(&self, partitioned: bool) {
        self.partitioned.store(partitioned, Ordering::SeqCst);
    }

    pub fn is_partitioned(&self) -> bool {
        self.partitioned.load(Ordering::SeqCst)
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

    pub fn arm_debit(&self, fault: DebitFault) {
        self.switches().debit = Some(fault);
    }

    pub fn arm_settle_slow(&self) {
        self.switches().settle_slow = true;
    }

    /// Whether a one-shot fault is still waiting for its message, or a slow debit is on its
    /// way.
    pub fn armed(&self) -> bool {
        let s = self.switches();
        s.install.is_some()
            || s.ack_lost
            || s.settle_reply_lost
            || s.debit.is_some()
            || s.settle_slow
            || s.deferred.is_some()
    }

    /// Faults stop (a slow debit on its way still arrives: see [`Self::deliver_deferred`]).
    pub fn disarm(&self) {
        let mut s = self.switches();
        s.install = None;
        s.ack_lost = false;
        s.settle_reply_lost = false;
        s.debit = None;
        s.settle_slow = false;
    }

    pub fn take_violations(&self) -> Vec<String> {
        std::mem::take(
            &mut *self
                .shared
                .violations
                .lock()
                .unwrap_or_else(|p| p.into_inner()),
        )
    }

    /// Debits applied whose answer was lost, since the last call.
    pub fn take_answers_lost(&self) -> Vec<AnswerLost> {
        std::mem::take(
            &mut *self
                .shared
                .answers_lost
                .lock()
                .unwrap_or_else(|p| p.into_inner()),
        )
    }

    /// How many debit faults have fired so far (compare before and after an edge call).
    pub fn debit_faults_fired(&self) -> u64 {
        self.shared.debit_faults_fired.load(Ordering::SeqCst)
    }

    /// The records in the region's usage stream (read past every switch: the simulator's
    /// look, not a caller's).
    pub async fn backlog(&self) -> Result<Option<UsageBacklog>> {
        self.inner().usage_backlog().await
    }

    /// Applies a slow call still on its way (at the end of a run, before the drain). A late
    /// settlement's answer goes nowhere: the edge sends its decisions again on its own.
    pub async fn deliver_deferred(&self) {
        let deferred = self.switches().deferred.take();
        match deferred {
            Some(Deferred::Debit(command)) => {
                let outcome = self.inner().debit(&command).await;
                self.note_answer_lost(&command, &outcome);
            }
            Some(Deferred::Settle(settlement)) => {
                // Whatever it answers, no caller waits for it.
                let _ = self.inner().settle_lease(&settlement).await;
            }
            None => {}
        }
    }

    fn note_answer_lost(&self, command: &DebitCommand, outcome: &Result<DebitOutcome>) {
        if let Ok(DebitOutcome::Allowed(allowed)) = outcome {
            if !allowed.replayed {
                self.shared
                    .answers_lost
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(AnswerLost {
                        account: command.account.clone(),
                        key: command.key.clone(),
                        feature: command.feature.clone(),
                        cost: command.cost,
                        at: command.now,
                        draws: allowed.draws.clone(),
                        overdraft: allowed.overdraft,
                    });
            }
        }
    }

    fn up(&self) -> Result<()> {
        if self.is_partitioned() {
            Err(RegionError::Redis(
                "connection refused (simulated partition)".into(),
            ))
        } else if self.is_down() {
            Err(RegionError::Redis(
                "connection refused (simulated restart)".into(),
            ))
        } else {
            Ok(())
        }
    }

    /// A call that reaches the region: then a slow debit on its way is applied after it.
    async fn pass<T>(&self, work: impl std::future::Future<Output = Result<T>>) -> Result<T> {
        self.up()?;
        let result = work.await;
        self.deliver_deferred().await;
        result
    }
}

impl RegionStore for FaultyRegion {
    fn retain_ms(&self) -> i64 {
        self.inner().retain_ms()
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
        let result = self.install(fault, account, key, segment, now).await;
        self.deliver_deferred().await;
        result
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
        self.pass(
            self.inner()
                .take_back(account, key, grant_id, amount, reconciled, now),
        )
        .await
    }

    async fn set_overdraft_limit(
        &self,
        account: &AccountId,
        limit: Credits,
        now: Timestamp,
    ) -> Result<()> {
        self.pass(self.inner().set_overdraft_limit(account, limit, now))
            .await
    }

    async fn set_rate_limit(
        &self,
        account: &AccountId,
        feature: &FeatureKey,
        limit: Option<RateLimit>,
        now: Timestamp,
    ) -> Result<()> {
        self.pass(self.inner().set_rate_limit(account, feature, limit, now))
            .await
    }

    async fn debit(&self, command: &DebitCommand) -> Result<DebitOutcome> {
        self.up()?;
        let fault = {
            let mut s = self.switches();
            match s.debit {
                // One slow call on its way at a time.
                Some(DebitFault::Slow) if s.deferred.is_some() => None,
                _ => s.debit.take(),
            }
        };
        if fault == Some(DebitFault::Slow) {
            self.switches().deferred = Some(Deferred::Debit(command.clone()));
            self.shared
                .debit_faults_fired
                .fetch_add(1, Ordering::SeqCst);
            return Err(RegionError::Redis(
                "no answer within the store timeout (simulated slow debit)".into(),
            ));
        }
        let outcome = self.inner().debit(command).await;
        self.deliver_deferred().await;
        if fault == Some(DebitFault::AnswerLost) && outcome.is_ok() {
            self.note_answer_lost(command, &outcome);
            self.shared
                .debit_faults_fired
                .fetch_add(1, Ordering::SeqCst);
            return Err(RegionError::Redis("debit answer lost (simulated)".into()));
        }
        outcome
    }

    async fn authorize(&self, command: &AuthorizeCommand) -> Result<AuthorizeOutcome> {
        self.pass(self.inner().authorize(command)).await
    }

    async fn capture(&self, command: &CaptureCommand) -> Result<CaptureOutcome> {
        self.pass(self.inner().capture(command)).await
    }

    async fn release(&self, command: &ReleaseCommand) -> Result<ReleaseOutcome> {
        self.pass(self.inner().release(command)).await
    }

    async fn reverse(&self, command: &ReverseCommand) -> Result<ReverseOutcome> {
        self.pass(self.inner().reverse(command)).await
    }

    async fn take_lease(&self, request: &LeaseRequest) -> Result<Lease> {
        self.pass(self.inner().take_lease(request)).await
    }

    async fn settle_lease(&self, settlement: &LeaseSettlement) -> Result<SettleOutcome> {
        self.up()?;
        let slow = {
            let mut s = self.switches();
            // One slow call on its way at a time.
            let slow = s.settle_slow && s.deferred.is_none();
            if slow {
                s.settle_slow = false;
                s.deferred = Some(Deferred::Settle(settlement.clone()));
            }
            slow
        };
        if slow {
            // Counted with the debit faults: a reversal that flushes first fails on it too.
            self.shared
                .debit_faults_fired
                .fetch_add(1, Ordering::SeqCst);
            return Err(RegionError::Redis(
                "no answer within the store timeout (simulated slow settlement)".into(),
            ));
        }
        let outcome = self.pass(self.inner().settle_lease(settlement)).await;
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
        self.pass(self.inner().return_lease(account, lease_id, now))
            .await
    }

    async fn view(&self, account: &AccountId, now: Timestamp) -> Result<AccountView> {
        self.pass(self.inner().view(account, now)).await
    }

    async fn create_usage_group(&self, group: &str) -> Result<()> {
        self.pass(self.inner().create_usage_group(group)).await
    }

    async fn read_usage(
        &self,
        group: &str,
        consumer: &str,
        max: usize,
    ) -> Result<Vec<UsageRecord>> {
        self.pass(self.inner().read_usage(group, consumer, max))
            .await
    }

    async fn read_usage_to_end(
        &self,
        group: &str,
        consumer: &str,
        max: usize,
    ) -> Result<UsageRead> {
        self.pass(self.inner().read_usage_to_end(group, consumer, max))
            .await
    }

    async fn ack_usage(&self, group: &str, ids: &[UsageId]) -> Result<u64> {
        self.up()?;
        if std::mem::take(&mut self.switches().ack_lost) {
            return Err(RegionError::Redis(
                "acknowledgement lost (simulated)".into(),
            ));
        }
        self.pass(self.inner().ack_usage(group, ids)).await
    }

    async fn usage_backlog(&self) -> Result<Option<UsageBacklog>> {
        self.pass(self.inner().usage_backlog()).await
    }

    async fn publish_price_book(&self, book: &tollgate_core::PriceBook) -> Result<u64> {
        self.pass(self.inner().publish_price_book(book)).await
    }

    async fn price_book_generation(&self) -> Result<u64> {
        self.pass(self.inner().price_book_generation()).await
    }

    async fn load_price_book(&self) -> Result<Option<PublishedPriceBook>> {
        self.pass(self.inner().load_price_book()).await
    }

    async fn publish_account(&self, summary: &AccountSummary) -> Result<()> {
        self.pass(self.inner().publish_account(summary)).await
    }

    async fn account_summary(&self, account: &AccountId) -> Result<Option<AccountSummary>> {
        self.pass(self.inner().account_summary(account)).await
    }

    async fn recall_leases(&self, account: &AccountId) -> Result<()> {
        self.pass(self.inner().recall_leases(account)).await
    }

    async fn watch_changes(&self) -> Result<tokio::sync::mpsc::Receiver<Change>> {
        self.pass(self.inner().watch_changes()).await
    }
}

impl FaultyRegion {
    /// An install message, with the fault armed for it (if any).
    async fn install(
        &self,
        fault: Option<InstallFault>,
        account: &AccountId,
        key: &IdempotencyKey,
        segment: &SegmentSpec,
        now: Timestamp,
    ) -> Result<SegmentInstalled> {
        let inner = self.inner();
        match fault {
            None => inner.install_segment(account, key, segment, now).await,
            Some(InstallFault::Lost) => Err(RegionError::Redis(
                "install lost on the way (simulated)".into(),
            )),
            Some(InstallFault::ReplyLost) => {
                inner.install_segment(account, key, segment, now).await?;
                Err(RegionError::Redis("install answer lost (simulated)".into()))
            }
            Some(InstallFault::Duplicated) => {
                let first = inner.install_segment(account, key, segment, now).await?;
                let second = inner.install_segment(account, key, segment, now).await?;
                if !second.replayed || second.pool != first.pool {
                    self.shared
                        .violations
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
}
