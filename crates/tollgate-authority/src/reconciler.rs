//! Reconciliation: each region's usage stream into the ledger.
//!
//! One consumer group per region's stream. A batch of records is read, its debits applied to
//! the ledger in one transaction, its reversals applied as refunds (each idempotent by a key
//! derived from the record), the allocation counters updated once per record, and only then
//! is the batch acknowledged. A record read but not acknowledged (the authority stopped) is
//! delivered again; the ledger's uniqueness on the debit id makes it a no-op.
//!
//! The watermark of a region is the event time up to which everything is reconciled. Event
//! times are not in stream order (captures carry their authorization's time, cached decisions
//! arrive a flush later, callers may date an event in the past), so the watermark only moves
//! when a read reaches the stream's end (nothing pending, and fewer new records than it asked
//! for): everything decided before that read started is in once its batch is acknowledged,
//! except what may still arrive late, bounded by `watermark_lateness_ms`.

use std::collections::{BTreeMap, HashMap};

use sha2::{Digest, Sha256};
use tollgate_core::command::{Memo, Refund, UsageDebit};
use tollgate_core::{
    AccountId, BurnPlan, Credits, DebitId, EntryKind, FeatureKey, IdempotencyKey, RegionId,
    Timestamp,
};
use tollgate_ledger::{EntryFilter, LedgerError, LedgerStore, PageRequest, UsageOutcome};
use tollgate_region::{RegionStore, UsageKind, UsageRecord};
use tracing::{info, warn};

use crate::allocator::BatchTail;
use crate::authority::Authority;
use crate::error::{AuthorityError, Result};
use crate::settings::{USAGE_BATCH_RECORDS_MAX, USAGE_CONSUMER, USAGE_GROUP};
use crate::state::UsageEffect;

/// Accounts whose late debt waits for a region's reconciliation at most; beyond, the debt
/// stands until the account's next grant.
const LATE_DEBT_ACCOUNTS_MAX: usize = 10_000;

/// Hex digits of the key's digest kept in a debit id (192 bits).
const DEBIT_ID_DIGEST_HEX: usize = 48;

/// Records read from one region, not yet acknowledged.
#[derive(Debug)]
pub struct UsageBatch {
    pub region: RegionId,
    pub records: Vec<UsageRecord>,
    /// When the read started: a drained read means everything decided before is in.
    pub read_at: Timestamp,
    /// The read reached the stream's end: nothing pending, and no record beyond those read.
    pub drained: bool,
}

/// What applying one batch did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReconcileReport {
    pub records: usize,
    pub applied: usize,
    pub duplicates: usize,
    pub reversed: usize,
    pub parked: usize,
    /// Accounts the batch touched (for refills and notifications).
    pub accounts: Vec<AccountId>,
    /// Usage in the ledger (applied now or before) that ran into overdraft, for debt a grant
    /// issued since should have settled (see `Authority::settle_late_debt`).
    pub overdrawn: Vec<Overdrawn>,
}

impl ReconcileReport {
    /// Adds another report's counts (a summary across batches; accounts and overdrawn usage,
    /// which a batch's own follow-up already handled, are not carried).
    pub fn add(&mut self, other: &ReconcileReport) {
        self.records += other.records;
        self.applied += other.applied;
        self.duplicates += other.duplicates;
        self.reversed += other.reversed;
        self.parked += other.parked;
    }
}

/// A usage record in the ledger that ran the account into overdraft.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Overdrawn {
    pub account: AccountId,
    pub debit: DebitId,
    /// The usage's event time.
    pub at: Timestamp,
    /// Micro-credits of overdraft.
    pub micros: i64,
}

/// The ledger's debit id for a region's decision: the region and a digest of the decision's
/// idempotency key (keys are unique per account and region, and may hold characters ids may
/// not). A reversal names its debit by the same key, so it finds the same id.
pub fn debit_id(region: &RegionId, key: &IdempotencyKey) -> Result<DebitId> {
    let digest = hex::encode(Sha256::digest(key.as_str().as_bytes()));
    DebitId::new(format!("{region}.{}", &digest[..DEBIT_ID_DIGEST_HEX]))
        .map_err(|e| AuthorityError::invalid("debit_id", e))
}

/// A key for an operation the authority derives from its cause, short enough for any cause.
pub(crate) fn derived_key(prefix: &str, parts: &[&str]) -> Result<IdempotencyKey> {
    let mut hasher = Sha256::new();
    for part in parts {
        hasher.update((part.len() as u64).to_be_bytes());
        hasher.update(part.as_bytes());
    }
    let digest = hex::encode(hasher.finalize());
    IdempotencyKey::new(format!("{prefix}:{}", &digest[..DEBIT_ID_DIGEST_HEX]))
        .map_err(|e| AuthorityError::invalid("idempotency_key", e))
}

fn usage_debit(
    region: &RegionId,
    record: &UsageRecord,
    units: &HashMap<FeatureKey, String>,
) -> Result<UsageDebit> {
    Ok(UsageDebit {
        debit_id: debit_id(region, &record.key)?,
        idempotency_key: Some(record.key.clone()),
        account: record.account.clone(),
        feature: record.feature.clone(),
        at: record.at,
        plan: BurnPlan {
            draws: record.draws.clone(),
            overdraft: record.overdraft,
        },
        price_version: record.price.version,
        price_rule: record.price.rule,
        quantity: record.price.quantity,
        rate: record.price.rate,
        // An explicit cost counts no unit.
        unit: record
            .price
            .quantity
            .and_then(|_| units.get(&record.feature).cloned()),
        actor: record.actor.clone(),
        region: Some(region.clone()),
        hold: record.hold_id.clone(),
    })
}

/// What a record did to the allocation counters: its draws spent (or, reversed, given back).
fn effect_of(record: &UsageRecord, sign: i64) -> UsageEffect {
    let mut spent: Vec<(String, i64)> = record
        .draws
        .iter()
        .map(|d| (d.grant_id.to_string(), sign * d.amount.micros()))
        .collect();
    if record.overdraft.is_positive() {
        spent.push((String::new(), sign * record.overdraft.micros()));
    }
    UsageEffect {
        usage_id: record.id.0.clone(),
        account: record.account.clone(),
        spent,
        pool: record.pool.micros(),
        at: record.at,
    }
}

fn describe(record: &UsageRecord) -> String {
    format!(
        "{:?} key={} account={} feature={} at={} cost={} draws={:?} overdraft={}",
        record.kind,
        record.key,
        record.account,
        record.feature,
        record.at,
        record.cost,
        record
            .draws
            .iter()
            .map(|d| format!("{}={}", d.grant_id, d.amount))
            .collect::<Vec<_>>(),
        record.overdraft
    )
}

impl<L: LedgerStore + ?Sized, R: RegionStore> Authority<L, R> {
    fn region_store(&self, region: &RegionId) -> Result<&std::sync::Arc<R>> {
        self.regions
            .get(region)
            .ok_or_else(|| AuthorityError::NotFound(format!("region {region}")))
    }

    /// Reads the next batch of a region's usage (records not acknowledged come first).
    pub async fn read_usage(&self, region: &RegionId) -> Result<UsageBatch> {
        let store = self.region_store(region)?;
        let read_at = self.clock.now();
        store
            .create_usage_group(USAGE_GROUP)
            .await
            .map_err(|e| AuthorityError::region(region, e))?;
        // A read answers the records still pending before any new ones; one that reached the
        // stream's end (new records short of the count, or none) proves it drained as of the
        // read, so the watermark moves under steady traffic too.
        let read = store
            .read_usage_to_end(USAGE_GROUP, USAGE_CONSUMER, USAGE_BATCH_RECORDS_MAX)
            .await
            .map_err(|e| AuthorityError::region(region, e))?;
        Ok(UsageBatch {
            region: region.clone(),
            records: read.records,
            read_at,
            drained: read.at_end,
        })
    }

    /// Applies a batch to the ledger and to the allocation counters, in stream order: each run
    /// of debits and captures in one transaction, each reversal between them as a refund.
    /// Order matters: a reversal gives its draws back in the region, where a later debit may
    /// spend them again; applying that debit before the refund would find the grant short.
    /// Safe to repeat: every effect is idempotent.
    pub async fn apply_usage(&self, batch: &UsageBatch) -> Result<ReconcileReport> {
        let now = self.clock.now();
        let region = &batch.region;
        let mut report = ReconcileReport {
            records: batch.records.len(),
            ..ReconcileReport::default()
        };
        let mut effects = Vec::with_capacity(batch.records.len());
        let mut rest = batch.records.as_slice();
        while !rest.is_empty() {
            let run = rest
                .iter()
                .position(|r| r.kind == UsageKind::Reverse)
                .unwrap_or(rest.len());
            let (debits, after) = rest.split_at(run);
            self.apply_debits(region, debits, now, &mut report, &mut effects)
                .await?;
            let Some((reversal, rest_after)) = after.split_first() else {
                break;
            };
            self.settle_before_refund(region, reversal, after, &mut report)
                .await;
            if self.refund_reversal(region, reversal, now).await? {
                report.reversed += 1;
                effects.push(effect_of(reversal, -1));
            } else {
                report.parked += 1;
            }
            rest = rest_after;
        }
        self.state
            .record_usage_effects(region, &effects, now)
            .await?;
        // Applied or parked, every record of the batch is now the ledger's or an operator's
        // business: take-backs may count on it (see `take_back_idle`).
        let mut seqs: std::collections::BTreeMap<&AccountId, u64> = Default::default();
        for record in &batch.records {
            let seq = seqs.entry(&record.account).or_default();
            *seq = (*seq).max(record.seq);
        }
        let seqs: Vec<(AccountId, u64)> = seqs
            .into_iter()
            .filter(|(_, seq)| *seq > 0)
            .map(|(account, seq)| (account.clone(), seq))
            .collect();
        if !seqs.is_empty() {
            self.state.record_usage_seq(region, &seqs).await?;
        }
        let mut accounts: Vec<AccountId> =
            batch.records.iter().map(|r| r.account.clone()).collect();
        accounts.sort();
        accounts.dedup();
        report.accounts = accounts;
        Ok(report)
    }

    /// Applies a run of debits and captures in one ledger transaction; a refused one is parked.
    async fn apply_debits(
        &self,
        region: &RegionId,
        debits: &[UsageRecord],
        now: Timestamp,
        report: &mut ReconcileReport,
        effects: &mut Vec<UsageEffect>,
    ) -> Result<()> {
        if debits.is_empty() {
            return Ok(());
        }
        let mut features: Vec<&FeatureKey> = debits
            .iter()
            .filter(|r| r.price.quantity.is_some())
            .map(|r| &r.feature)
            .collect();
        features.sort();
        features.dedup();
        let units = self.state.feature_units(&features).await?;
        let commands = debits
            .iter()
            .map(|r| usage_debit(region, r, &units))
            .collect::<Result<Vec<_>>>()?;
        let outcomes = self.ledger.apply_usage(commands, now).await?;
        for (record, outcome) in debits.iter().zip(outcomes) {
            // The ledger's id for it: a key reused after the region forgot it is charged
            // under a later generation of the id (`debit_generation`).
            let debit = match outcome {
                UsageOutcome::Applied { debit_id, .. } => {
                    report.applied += 1;
                    debit_id
                }
                UsageOutcome::Duplicate { debit_id } => {
                    report.duplicates += 1;
                    debit_id
                }
                UsageOutcome::Refused { refusal, .. } => {
                    self.park(region, record, &refusal.message, now).await?;
                    report.parked += 1;
                    continue;
                }
            };
            // A duplicate too: a crash may have come between applying it and settling.
            if record.overdraft.is_positive() {
                report.overdrawn.push(Overdrawn {
                    account: record.account.clone(),
                    debit,
                    at: record.at,
                    micros: record.overdraft.micros(),
                });
            }
            effects.push(effect_of(record, 1));
        }
        Ok(())
    }

    /// A reversal undoes its debit in the ledger as a refund of the whole debit, as of the
    /// reversal's own time: the region gave the draws back to their segments then, and later
    /// debits there may spend them from the same grants before the grant expires. Judged at
    /// reconciliation time instead, a grant that has expired since would send the credits to a
    /// new refund grant, and those later debits would find their grant short (found by the
    /// simulation, seed 11). Returns false when the ledger cannot take it (the record is
    /// parked).
    async fn refund_reversal(
        &self,
        region: &RegionId,
        record: &UsageRecord,
        now: Timestamp,
    ) -> Result<bool> {
        let base = debit_id(region, &record.key)?;
        let debit = self
            .latest_generation(&record.account, base.clone())
            .await?;
        let mut parts = vec![
            region.as_str(),
            record.account.as_str(),
            record.key.as_str(),
        ];
        if debit != base {
            // A later decision under a reused key is reversed under a key of its own.
            parts.push(debit.as_str());
        }
        let key = derived_key("reverse", &parts)?;
        // An operator may have refunded part of the debit already: the reversal refunds what
        // is left, and the region, which gave the whole cost back, returns the rest.
        let Some(refundable) = self
            .refundable_but_for(&record.account, &debit, &key)
            .await?
        else {
            self.park(region, record, "its debit is not in the ledger", now)
                .await?;
            return Ok(false);
        };
        let amount = record.cost.min(refundable);
        if amount.is_positive() {
            let command = Refund {
                key,
                account: record.account.clone(),
                debit: debit.clone(),
                amount,
                refund_grant_id: None,
                refund_grant_expires_at: None,
                memo: Memo::new(format!("reversed in region {region}"))
                    .map_err(|e| AuthorityError::invalid("memo", e))?,
            };
            let reason = match self.ledger.refund(command, record.at.min(now)).await {
                Ok(Ok(receipt)) => {
                    self.take_back_settled_overdraft(region, record, amount, &receipt, now)
                        .await?;
                    None
                }
                Ok(Err(refusal)) => Some(refusal.message),
                Err(LedgerError::UnknownDebit { .. }) => {
                    Some("its debit is not in the ledger".to_owned())
                }
                Err(LedgerError::UnknownAccount(_)) => Some("unknown account".to_owned()),
                Err(other) => return Err(other.into()),
            };
            if let Some(reason) = reason {
                self.park(region, record, &reason, now).await?;
                return Ok(false);
            }
        }
        let excess = record.cost.micros() - amount.micros();
        if excess > 0 {
            self.take_back_reversal_excess(region, record, &debit, excess, now)
                .await?;
        }
        Ok(true)
    }

    /// The region's reversal gave the debit's overdraft back as overdraft room; the ledger pays
    /// debt back with it only as far as the debt it ran up still stands. Debt a grant settled
    /// in the meantime was paid from that grant, so the ledger refunds the rest as credits (a
    /// refund grant, which allocation hands out) and the region's room given back for it would
    /// be spendable twice: it is taken back from the region's overdraft limit. Done when the
    /// refund is first applied (a replay after a restart between the two finds it done, or
    /// logs what may be left).
    async fn take_back_settled_overdraft(
        &self,
        region: &RegionId,
        record: &UsageRecord,
        amount: Credits,
        receipt: &tollgate_ledger::Receipt,
        now: Timestamp,
    ) -> Result<()> {
        let to_debt: i64 = receipt
            .movements
            .iter()
            .filter(|m| m.kind == EntryKind::Refund && m.grant_id.is_none())
            .map(|m| m.amount.micros())
            .sum();
        let surplus = record.overdraft.min(amount).micros() - to_debt;
        if surplus <= 0 {
            return Ok(());
        }
        if receipt.replayed {
            warn!(%region, account = %record.account, key = %record.key, surplus, "a replayed reversal's overdraft room may still be in the region (taken back before a restart, or not)");
            return Ok(());
        }
        // Under the account's lock: an allocation deciding the region's room meanwhile would
        // set it from the limit read before this one.
        let lock = self.account_lock(&record.account);
        let _held = lock.lock().await;
        let store = self.region_store(region)?;
        let view = store
            .view(&record.account, now)
            .await
            .map_err(|e| AuthorityError::region(region, e))?;
        let limit = view
            .overdraft_limit
            .saturating_sub_floor_zero(Credits::from_micros(surplus));
        store
            .set_overdraft_limit(&record.account, limit, now)
            .await
            .map_err(|e| AuthorityError::region(region, e))?;
        let taken = view.overdraft_limit.micros() - limit.micros();
        if taken > 0 {
            self.state
                .add_taken_back(region, &record.account, "", taken)
                .await?;
            // The region's room and the debt basis moved together: its edges tell the same
            // balance once the summary says so.
            self.publish_summary_held(region, &record.account).await?;
        }
        Ok(())
    }

    /// What of `debit` is left to refund, not counting the refund made under `own` (this very
    /// reversal, applied before a crash): `None` when the ledger has no such debit.
    async fn refundable_but_for(
        &self,
        account: &AccountId,
        debit: &DebitId,
        own: &IdempotencyKey,
    ) -> Result<Option<Credits>> {
        let own = format!("key:{own}");
        let filter = EntryFilter {
            debit: Some(debit.clone()),
            kinds: vec![EntryKind::Debit, EntryKind::Refund],
            ..EntryFilter::account(account.clone())
        };
        let mut page = PageRequest {
            size: tollgate_ledger::PAGE_SIZE_MAX,
            token: None,
        };
        let (mut debited, mut refunded, mut seen) = (0_i64, 0_i64, false);
        loop {
            let found = self.ledger.entries(&filter, page.clone()).await?;
            for entry in &found.items {
                match entry.kind {
                    EntryKind::Debit => {
                        seen = true;
                        debited += entry.amount.micros();
                    }
                    EntryKind::Refund if entry.operation != own => {
                        refunded += entry.amount.micros();
                    }
                    _ => {}
                }
            }
            match found.next_token {
                Some(token) => page.token = Some(token),
                None => break,
            }
        }
        Ok(seen.then(|| Credits::from_micros((debited - refunded).max(0))))
    }

    /// A reversal gave back in the region more than the ledger could refund (an operator
    /// refunded part of the debit first): the region returns the difference, from the debit's
    /// grants, last drawn first, each under a key of its own so a replay takes nothing twice.
    /// What the region no longer holds (spent since) is logged: the usage that spent it finds
    /// the ledger short and is parked, where an operator sees it.
    async fn take_back_reversal_excess(
        &self,
        region: &RegionId,
        record: &UsageRecord,
        debit: &DebitId,
        excess: i64,
        now: Timestamp,
    ) -> Result<()> {
        let store = self.region(region)?;
        let mut left = excess;
        for draw in record.draws.iter().rev() {
            if left <= 0 {
                break;
            }
            let want = left.min(draw.amount.micros());
            let key = derived_key(
                "reverse-excess",
                &[
                    region.as_str(),
                    record.account.as_str(),
                    debit.as_str(),
                    draw.grant_id.as_str(),
                ],
            )?;
            let taken = store
                .take_back(
                    &record.account,
                    &key,
                    &draw.grant_id,
                    Credits::from_micros(want),
                    None,
                    now,
                )
                .await
                .map_err(|e| AuthorityError::region(region, e))?;
            if taken.taken.is_positive() && !taken.replayed {
                self.state
                    .add_taken_back(
                        region,
                        &record.account,
                        draw.grant_id.as_str(),
                        taken.taken.micros(),
                    )
                    .await?;
            }
            left -= want;
            if taken.taken.micros() < want {
                warn!(%region, account = %record.account, grant = %draw.grant_id,
                    short = want - taken.taken.micros(),
                    "a reversal gave back credits the ledger had refunded already, and the region spent them since");
            }
        }
        Ok(())
    }

    /// The latest decision the ledger charged under `base` (see `debit_generation`): a
    /// region's reversal names its key, and the region knows only the last decision made
    /// under it.
    async fn latest_generation(&self, account: &AccountId, base: DebitId) -> Result<DebitId> {
        let mut latest = base.clone();
        for generation in 2..=tollgate_ledger::DEBIT_GENERATIONS_MAX {
            let next = tollgate_ledger::debit_generation(&base, generation)?;
            let filter = EntryFilter {
                debit: Some(next.clone()),
                ..EntryFilter::account(account.clone())
            };
            let page = PageRequest {
                size: 1,
                token: None,
            };
            if self.ledger.entries(&filter, page).await?.items.is_empty() {
                break;
            }
            latest = next;
        }
        Ok(latest)
    }

    async fn park(
        &self,
        region: &RegionId,
        record: &UsageRecord,
        reason: &str,
        now: Timestamp,
    ) -> Result<()> {
        warn!(%region, account = %record.account, key = %record.key, reason, "usage parked");
        self.state
            .park_usage_record(region, record, reason, &describe(record), now)
            .await
    }

    /// Acknowledges a batch whose effects are durable, and moves the watermark when the read
    /// found the stream drained.
    pub async fn acknowledge(&self, batch: UsageBatch) -> Result<()> {
        let store = self.region_store(&batch.region)?;
        let ids: Vec<_> = batch.records.iter().map(|r| r.id.clone()).collect();
        if !ids.is_empty() {
            store
                .ack_usage(USAGE_GROUP, &ids)
                .await
                .map_err(|e| AuthorityError::region(&batch.region, e))?;
            let ids: Vec<String> = ids.into_iter().map(|id| id.0).collect();
            self.state.forget_usage(&batch.region, &ids).await?;
        }
        if batch.drained {
            let lateness = self.settings.watermark_lateness_ms;
            let mark = Timestamp::from_millis(batch.read_at.millis() - lateness)
                .unwrap_or(Timestamp::EPOCH);
            self.state.advance_watermark(&batch.region, mark).await?;
        }
        Ok(())
    }

    /// Reads, applies and acknowledges one batch of a region, then refills the accounts whose
    /// regional pool ran low.
    pub async fn reconcile_once(&self, region: &RegionId) -> Result<ReconcileReport> {
        let lock = self.reconcile_lock(region);
        let _held = match &lock {
            Some(lock) => Some(lock.lock().await),
            None => None,
        };
        let batch = self.read_usage(region).await?;
        let report = self.apply_usage(&batch).await?;
        self.acknowledge(batch).await?;
        if report.records > 0 {
            info!(
                %region,
                records = report.records,
                applied = report.applied,
                duplicates = report.duplicates,
                reversed = report.reversed,
                parked = report.parked,
                "usage reconciled"
            );
        }
        self.settle_late_debts(region, &report.overdrawn).await;
        for account in &report.accounts {
            self.mark_dirty(account);
            if let Err(error) = self.refill_if_low(region, account).await {
                warn!(%region, %account, %error, "refill failed");
            }
        }
        Ok(report)
    }

    /// Before a reversal is refunded, settles the late debt of its account's usage applied so
    /// far in the batch (see `settle_late_debt`): the refund pays debt back first, and debt a
    /// grant issued since should have settled is not the refund's to pay (had the usage
    /// arrived first, the grant would have settled it before the reversal came). `tail` is
    /// the batch from the reversal on. What this cannot settle yet is left in the report for
    /// the end of the batch.
    async fn settle_before_refund(
        &self,
        region: &RegionId,
        reversal: &UsageRecord,
        tail: &[UsageRecord],
        report: &mut ReconcileReport,
    ) {
        let account = &reversal.account;
        let (mine, others): (Vec<Overdrawn>, Vec<Overdrawn>) =
            std::mem::take(&mut report.overdrawn)
                .into_iter()
                .partition(|usage| &usage.account == account);
        report.overdrawn = others;
        if mine.is_empty() {
            return;
        }
        let mut batch_tail = BatchTail {
            region: region.clone(),
            through_seq: 0,
            returns: BTreeMap::new(),
        };
        for record in tail.iter().filter(|r| &r.account == account) {
            batch_tail.through_seq = batch_tail.through_seq.max(record.seq);
            if record.kind == UsageKind::Reverse {
                for draw in &record.draws {
                    *batch_tail.returns.entry(draw.grant_id.clone()).or_default() +=
                        draw.amount.micros();
                }
            }
        }
        match self
            .settle_late_debt(account, &mine, Some(&batch_tail))
            .await
        {
            Ok(waiting) => report.overdrawn.extend(waiting),
            Err(error) => {
                warn!(%region, %account, %error, "settling debt before a refund failed; tried again after the batch");
                report.overdrawn.extend(mine);
            }
        }
    }

    /// Settles the debt of usage just reconciled, and of usage waiting from earlier passes,
    /// from grants issued after it (see `settle_late_debt`). A failure leaves the debt
    /// standing, as if the usage had arrived first; it is logged.
    async fn settle_late_debts(&self, region: &RegionId, overdrawn: &[Overdrawn]) {
        let mut waiting = {
            let mut late = match self.late_debt.lock() {
                Ok(late) => late,
                Err(poisoned) => poisoned.into_inner(),
            };
            std::mem::take(&mut *late)
        };
        for usage in overdrawn {
            let list = waiting.entry(usage.account.clone()).or_default();
            if !list.iter().any(|u| u.debit == usage.debit) {
                list.push(usage.clone());
            }
        }
        let mut still = BTreeMap::new();
        for (account, usage) in waiting {
            match self.settle_late_debt(&account, &usage, None).await {
                Ok(left) if !left.is_empty() => {
                    still.insert(account, left);
                }
                Ok(_) => {}
                Err(error) => {
                    warn!(%region, %account, %error, "settling debt from a grant issued since failed; the debt stands until the next grant");
                }
            }
        }
        let mut late = match self.late_debt.lock() {
            Ok(late) => late,
            Err(poisoned) => poisoned.into_inner(),
        };
        for (account, usage) in still {
            if late.len() < LATE_DEBT_ACCOUNTS_MAX {
                late.entry(account).or_default().extend(usage);
            }
        }
    }

    /// Reconciles every region, each up to `passes_max` batches. A region that fails does not
    /// hold the others back: they are all reconciled, and the first failure is returned after.
    pub async fn reconcile_all(&self, passes_max: usize) -> Result<ReconcileReport> {
        let mut total = ReconcileReport::default();
        let mut first_failure = None;
        let regions: Vec<RegionId> = self.regions.keys().cloned().collect();
        for region in &regions {
            match self.reconcile_region(region, passes_max).await {
                Ok(report) => total.add(&report),
                Err(error) => {
                    warn!(%region, %error, "reconciliation of the region failed");
                    first_failure.get_or_insert(error);
                }
            }
        }
        match first_failure {
            Some(error) => Err(error),
            None => Ok(total),
        }
    }

    /// Reconciles one region, up to `passes_max` batches or until its stream is empty.
    pub async fn reconcile_region(
        &self,
        region: &RegionId,
        passes_max: usize,
    ) -> Result<ReconcileReport> {
        let mut total = ReconcileReport::default();
        for _ in 0..passes_max {
            let report = self.reconcile_once(region).await?;
            total.add(&report);
            if report.records == 0 {
                break;
            }
        }
        self.metrics.reconciled(region, self.clock.now());
        Ok(total)
    }

    /// The event time up to which every region has reconciled: the least watermark, or
    /// `None` while some region has never been drained.
    pub async fn reconciled_through(&self) -> Result<Option<Timestamp>> {
        let marks = self.state.watermarks().await?;
        let mut least: Option<Timestamp> = None;
        for region in self.regions.keys() {
            let Some(mark) = marks.get(region).copied() else {
                return Ok(None);
            };
            least = Some(least.map_or(mark, |l| l.min(mark)));
        }
        Ok(least)
    }
}
