//! The in-memory regional store for the embedded single node. It follows the Lua scripts step
//! by step (same sweep, same planning, same bucket arithmetic), and the conformance suite holds
//! both to the same answers.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::Mutex;

use tollgate_core::grant::burn_key_order;
use tollgate_core::{
    AccountId, ActorId, Credits, Draw, FeatureKey, GrantId, HoldId, IdempotencyKey, LeaseId, Scope,
    Timestamp,
};

use crate::types::*;
use crate::{debit_fingerprint, derived_key, RegionStore, Result, DERIVED_KEYS_MAX};

/// Due holds and leases handled per call, as in the scripts.
const SWEEP_MAX: usize = 64;

#[derive(Clone, Debug)]
struct SegmentEntry {
    remaining: i64,
    priority: u32,
    effective_at: Timestamp,
    expires_at: Option<Timestamp>,
    scope: Scope,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum HoldState {
    Pending,
    Captured,
    Released,
    Expired,
}

#[derive(Clone, Debug)]
struct HoldEntry {
    state: HoldState,
    expires_at: i64,
    created_at: Timestamp,
    feature: FeatureKey,
    amount: i64,
    overdraft: i64,
    draws: Vec<(GrantId, i64)>,
    price: PriceTag,
    actor: Option<ActorId>,
}

#[derive(Clone, Debug, Default)]
struct LeaseEntry {
    expires_at: i64,
    overdraft: i64,
    slices: Vec<(GrantId, i64)>,
}

#[derive(Clone, Copy, Debug)]
struct Bucket {
    amount: i64,
    period_ms: i64,
    burst: i64,
    tokens: i64,
    last_ms: i64,
}

/// What an idempotency key remembers: the request's fingerprint and its first result.
#[derive(Clone, Debug)]
struct Remembered {
    fingerprint: String,
    result: Stored,
    forget_at: i64,
    /// For a debit: whether it has been reversed.
    reversed: bool,
}

#[derive(Clone, Debug)]
enum Stored {
    /// A debit, with what its reversal's usage record needs, and the lease it was settled
    /// from (none for a strict debit).
    Debit(Allowed, FeatureKey, PriceTag, Option<LeaseId>),
    Reverse(Credits, UsageId),
    Hold(HoldPlaced),
    Capture(Captured),
    Release(Credits),
    Lease(Lease),
    Install(SegmentInstalled),
    TakeBack(TakenBack),
}

#[derive(Default)]
struct AccountState {
    /// Segments holding credits (or owing them: never below zero in practice).
    segments: BTreeMap<GrantId, SegmentEntry>,
    /// Segments spent to zero: only their terms, kept for credits given back to them. Every
    /// decision reads `segments` alone, so its work follows what the account holds, not how
    /// many grants it ever had.
    retired: BTreeMap<GrantId, SegmentEntry>,
    od_limit: i64,
    od_used: i64,
    holds: BTreeMap<HoldId, HoldEntry>,
    hold_due: BTreeSet<(i64, HoldId)>,
    leases: BTreeMap<LeaseId, LeaseEntry>,
    lease_due: BTreeSet<(i64, LeaseId)>,
    limits: HashMap<FeatureKey, (i64, i64, i64)>,
    buckets: HashMap<FeatureKey, (i64, i64)>,
    remembered: HashMap<IdempotencyKey, Remembered>,
    /// Usage records appended for the account (the last one's `seq`).
    usage_seq: u64,
    /// Times the authority moved credits or overdraft room in or out ([`AccountView::moves`]).
    moves: u64,
}

#[derive(Default)]
struct Group {
    next: u64,
    pending: BTreeMap<u64, String>,
}

#[derive(Default)]
struct State {
    price_book: Option<PublishedPriceBook>,
    summaries: HashMap<AccountId, AccountSummary>,
    watchers: Vec<tokio::sync::mpsc::Sender<Change>>,
    accounts: HashMap<AccountId, AccountState>,
    stream: VecDeque<(u64, UsageRecord)>,
    next_seq: u64,
    groups: HashMap<String, Group>,
    retain_ms: i64,
}

/// The regional store kept in this process.
pub struct MemoryRegionStore {
    state: Mutex<State>,
}

impl Default for MemoryRegionStore {
    fn default() -> Self {
        MemoryRegionStore::new(RETAIN_MS_DEFAULT)
    }
}

impl MemoryRegionStore {
    /// `retain_ms`: how long idempotency keys and ended holds are remembered.
    pub fn new(retain_ms: i64) -> Self {
        MemoryRegionStore {
            state: Mutex::new(State {
                retain_ms,
                ..State::default()
            }),
        }
    }

    fn with<T>(&self, work: impl FnOnce(&mut State) -> T) -> T {
        // A panic while holding the lock leaves no half-made decision behind: every operation
        // checks before it changes anything. So a poisoned lock's state is still consistent.
        let mut state = self
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        work(&mut state)
    }
}

impl AccountState {
    fn recall(&self, key: &IdempotencyKey, fingerprint: &str, now: i64) -> Option<Result<Stored>> {
        let remembered = self.remembered.get(key).filter(|r| now < r.forget_at)?;
        if remembered.fingerprint != fingerprint {
            return Some(Err(RegionError::IdempotencyConflict));
        }
        Some(Ok(remembered.result.clone()))
    }

    /// What `key` remembers for `entry`, settled now from the settlement's lease. The same
    /// decision is the same request at the same time with the same draws, from the same lease,
    /// remembered before this settlement (`written`: keys this settlement wrote).
    fn remembered_as(
        &self,
        key: &IdempotencyKey,
        fingerprint: &str,
        settlement: &LeaseSettlement,
        entry: &LeaseUsage,
        written: &HashSet<IdempotencyKey>,
        now: i64,
    ) -> Seen {
        let Some(remembered) = self.remembered.get(key).filter(|r| now < r.forget_at) else {
            return Seen::Nothing;
        };
        if remembered.fingerprint != fingerprint {
            return Seen::Other;
        }
        match &remembered.result {
            Stored::Debit(allowed, _, _, Some(lease_id))
                if !written.contains(key)
                    && *lease_id == settlement.lease_id
                    && allowed.at == entry.at
                    && allowed.draws == entry.draws
                    && allowed.overdraft == entry.overdraft =>
            {
                Seen::Same(allowed.usage_id.clone())
            }
            _ => Seen::Again,
        }
    }

    fn remember(
        &mut self,
        key: &IdempotencyKey,
        fingerprint: String,
        result: Stored,
        now: i64,
        retain_ms: i64,
    ) {
        self.remembered.insert(
            key.clone(),
            Remembered {
                fingerprint,
                result,
                forget_at: now.saturating_add(retain_ms),
                reversed: false,
            },
        );
    }

    fn give_back(&mut self, draws: &[(GrantId, i64)], overdraft: i64) {
        for (grant, amount) in draws {
            if *amount > 0 {
                self.add_to_segment(grant, *amount);
            }
        }
        self.od_used -= overdraft;
    }

    /// The scripts' `add_to_segment`: moves a segment's remainder by `delta`. A segment spent
    /// to zero is retired; credits given back to a retired one bring it back. Credits for a
    /// grant the region never held are dropped, as the scripts do. Returns the remainder.
    fn add_to_segment(&mut self, grant: &GrantId, delta: i64) -> i64 {
        if let Some(segment) = self.segments.get_mut(grant) {
            segment.remaining += delta;
            let left = segment.remaining;
            if left == 0 {
                if let Some(segment) = self.segments.remove(grant) {
                    self.retired.insert(grant.clone(), segment);
                }
            }
            return left;
        }
        if delta > 0 {
            if let Some(mut segment) = self.retired.remove(grant) {
                segment.remaining = delta;
                self.segments.insert(grant.clone(), segment);
                return delta;
            }
        }
        0
    }

    /// A segment's terms, live or retired.
    fn segment_terms(&self, grant: &GrantId) -> Option<&SegmentEntry> {
        self.segments.get(grant).or_else(|| self.retired.get(grant))
    }

    fn end_hold(&mut self, id: &HoldId, state: HoldState, now: i64, retain_ms: i64) {
        let Some(hold) = self.holds.get_mut(id) else {
            return;
        };
        self.hold_due.remove(&(hold.expires_at, id.clone()));
        hold.state = state;
        self.hold_due
            .insert((now.saturating_add(retain_ms), id.clone()));
    }

    /// The scripts' `sweep`: expired holds and leases give their credits back.
    fn sweep(&mut self, now: i64, retain_ms: i64) {
        let due: Vec<(i64, HoldId)> = self
            .hold_due
            .iter()
            .take_while(|(at, _)| *at <= now)
            .take(SWEEP_MAX)
            .cloned()
            .collect();
        for (at, id) in due {
            self.hold_due.remove(&(at, id.clone()));
            match self.holds.get(&id).cloned() {
                Some(hold) if hold.state == HoldState::Pending => {
                    self.give_back(&hold.draws, hold.overdraft);
                    self.hold_due.insert((hold.expires_at, id.clone()));
                    self.end_hold(&id, HoldState::Expired, hold.expires_at, retain_ms);
                }
                Some(_) => {
                    self.holds.remove(&id);
                }
                None => {}
            }
        }
        let due: Vec<(i64, LeaseId)> = self
            .lease_due
            .iter()
            .take_while(|(at, _)| *at <= now)
            .take(SWEEP_MAX)
            .cloned()
            .collect();
        for (at, id) in due {
            self.lease_due.remove(&(at, id.clone()));
            if let Some(lease) = self.leases.remove(&id) {
                self.give_back(&lease.slices, lease.overdraft);
            }
        }
    }

    fn pool(&self) -> i64 {
        self.segments.values().map(|s| s.remaining).sum()
    }

    /// The scripts' `plan` pool: credits of the segments that can be spent at `now`.
    fn active_pool(&self, now: Timestamp) -> i64 {
        self.segments
            .values()
            .filter(|s| active(s, now))
            .map(|s| s.remaining)
            .sum()
    }

    /// The scripts' `plan`: draws over eligible segments in burn-down order, then overdraft.
    fn plan(
        &self,
        feature: &FeatureKey,
        now: Timestamp,
        cost: i64,
    ) -> std::result::Result<(Vec<(GrantId, i64)>, i64), i64> {
        self.plan_within(feature, now, cost, (self.od_limit - self.od_used).max(0))
    }

    /// [`Self::plan`] with `room` for overdraft.
    fn plan_within(
        &self,
        feature: &FeatureKey,
        now: Timestamp,
        cost: i64,
        room: i64,
    ) -> std::result::Result<(Vec<(GrantId, i64)>, i64), i64> {
        let mut eligible: Vec<(&GrantId, &SegmentEntry)> = self
            .segments
            .iter()
            .filter(|(_, s)| active(s, now) && s.remaining > 0 && s.scope.covers(feature))
            .collect();
        eligible.sort_by(|(a_id, a), (b_id, b)| {
            burn_key_order(
                (a.priority, a.expires_at, a.effective_at, a_id),
                (b.priority, b.expires_at, b.effective_at, b_id),
            )
        });
        let mut left = cost;
        let mut from_segments = 0_i64;
        let mut draws = Vec::new();
        for (id, segment) in eligible {
            from_segments += segment.remaining;
            if left > 0 {
                let take = left.min(segment.remaining);
                left -= take;
                draws.push((id.clone(), take));
            }
        }
        if left <= room {
            Ok((draws, left))
        } else {
            Err(from_segments + room)
        }
    }

    fn take(&mut self, draws: &[(GrantId, i64)], overdraft: i64) {
        for (grant, amount) in draws {
            if *amount > 0 {
                self.add_to_segment(grant, -amount);
            }
        }
        self.od_used += overdraft;
    }

    /// The scripts' `bucket`: refilled state of a feature's token bucket, if it has one.
    fn bucket(&self, feature: &FeatureKey, now: i64) -> Option<Bucket> {
        let &(amount, period_ms, burst) = self.limits.get(feature)?;
        let (mut tokens, mut last_ms) = self.buckets.get(feature).copied().unwrap_or((burst, now));
        if now > last_ms {
            // The same double-precision formula as the script, so both refill identically.
            let refill = ((now - last_ms) as f64 * amount as f64 / period_ms as f64).floor() as i64;
            if tokens.saturating_add(refill) >= burst {
                (tokens, last_ms) = (burst, now);
            } else if refill > 0 {
                tokens += refill;
                last_ms += (refill as f64 * period_ms as f64 / amount as f64).floor() as i64;
            }
        }
        Some(Bucket {
            amount,
            period_ms,
            burst,
            tokens: tokens.min(burst),
            last_ms,
        })
    }
}

impl AccountState {
    /// The scripts' spending step, shared by debit and authorize: the feature's token bucket,
    /// then the draws and overdraft; on success both are taken.
    /// A served decision recorded whatever the account holds (`DebitCommand::forced`): the
    /// segments pay what they can, the rest is overdraft beyond the room if need be; the
    /// feature's bucket is left alone.
    fn spend_forced(
        &mut self,
        feature: &FeatureKey,
        now: Timestamp,
        cost: i64,
    ) -> (Vec<(GrantId, i64)>, i64) {
        let room = (self.od_limit - self.od_used).max(0).saturating_add(cost);
        let (draws, overdraft) = self
            .plan_within(feature, now, cost, room)
            .unwrap_or_else(|_| (Vec::new(), cost));
        self.take(&draws, overdraft);
        (draws, overdraft)
    }

    fn spend(
        &mut self,
        feature: &FeatureKey,
        now: Timestamp,
        cost: i64,
    ) -> std::result::Result<(Vec<(GrantId, i64)>, i64), Refusal> {
        let bucket = self.bucket(feature, now.millis());
        if let Some(refusal) = bucket_refusal(bucket, feature, cost, now.millis()) {
            return Err(refusal);
        }
        let (draws, overdraft) =
            self.plan(feature, now, cost)
                .map_err(|available| Refusal::Insufficient {
                    available: Credits::from_micros(available),
                    shortfall: Credits::from_micros(cost - available),
                })?;
        self.take(&draws, overdraft);
        if let Some(b) = bucket {
            self.buckets
                .insert(feature.clone(), (b.tokens - cost, b.last_ms));
        }
        Ok((draws, overdraft))
    }
}

fn active(segment: &SegmentEntry, now: Timestamp) -> bool {
    segment.effective_at <= now && segment.expires_at.is_none_or(|expires_at| now < expires_at)
}

fn bucket_refusal(
    bucket: Option<Bucket>,
    feature: &FeatureKey,
    cost: i64,
    now: i64,
) -> Option<Refusal> {
    let b = bucket?;
    if cost <= b.tokens {
        return None;
    }
    let retry_after_ms = (cost <= b.burst).then(|| {
        let wait = ((cost - b.tokens) as f64 * b.period_ms as f64 / b.amount as f64).ceil() as i64
            - (now - b.last_ms);
        wait.max(1) as u64
    });
    Some(Refusal::RateLimited {
        feature: feature.clone(),
        retry_after_ms,
    })
}

fn draws_of(pairs: &[(GrantId, i64)]) -> Vec<Draw> {
    pairs
        .iter()
        .map(|(grant_id, amount)| Draw {
            grant_id: grant_id.clone(),
            amount: Credits::from_micros(*amount),
        })
        .collect()
}

impl State {
    /// Sends a notice to every watcher; a full or closed channel loses it (readers also poll).
    fn notify(&mut self, change: Change) {
        self.watchers.retain(|watcher| !watcher.is_closed());
        for watcher in &self.watchers {
            let _ = watcher.try_send(change.clone());
        }
    }

    fn account(&mut self, account: &AccountId) -> &mut AccountState {
        self.accounts.entry(account.clone()).or_default()
    }

    fn append(&mut self, mut record: UsageRecord, now: i64) -> UsageId {
        self.next_seq += 1;
        let id = UsageId(format!("{now}-{}", self.next_seq));
        record.id = id.clone();
        let account = self.account(&record.account);
        account.usage_seq += 1;
        record.seq = account.usage_seq;
        self.stream.push_back((self.next_seq, record));
        id
    }

    /// The status of one settled entry: its own key first, then derived keys in turn, as
    /// `lease_settle.lua` does.
    fn settle_entry(
        &mut self,
        settlement: &LeaseSettlement,
        entry: &LeaseUsage,
        lease: &mut LeaseEntry,
        written: &mut HashSet<IdempotencyKey>,
        now: i64,
        retain_ms: i64,
    ) -> SettleStatus {
        let fingerprint = debit_fingerprint(&entry.feature, entry.cost(), &entry.price);
        let mut key = entry.key.clone();
        for _ in 0..=DERIVED_KEYS_MAX {
            let a = self.account(&settlement.account);
            let usage_id =
                match a.remembered_as(&key, &fingerprint, settlement, entry, written, now) {
                    Seen::Other => {
                        key = derived_key(&key, &fingerprint);
                        continue;
                    }
                    Seen::Again => return SettleStatus::Duplicate,
                    Seen::Same(usage_id) => usage_id,
                    Seen::Nothing => {
                        if let Some(problem) = lease_problem(lease, entry) {
                            return SettleStatus::Rejected(problem);
                        }
                        written.insert(key.clone());
                        self.record_entry(
                            settlement,
                            entry,
                            &key,
                            fingerprint,
                            lease,
                            now,
                            retain_ms,
                        )
                    }
                };
            return if key == entry.key {
                SettleStatus::Recorded(usage_id)
            } else {
                SettleStatus::Rekeyed { usage_id, key }
            };
        }
        SettleStatus::Rejected(
            "idempotency key and its derived keys all used by other requests".to_string(),
        )
    }

    /// Charges a settled entry under `key`: spends it from the lease, appends its usage record
    /// and remembers the key.
    #[allow(clippy::too_many_arguments)]
    fn record_entry(
        &mut self,
        settlement: &LeaseSettlement,
        entry: &LeaseUsage,
        key: &IdempotencyKey,
        fingerprint: String,
        lease: &mut LeaseEntry,
        now: i64,
        retain_ms: i64,
    ) -> UsageId {
        for draw in &entry.draws {
            if let Some((_, amount)) = lease.slices.iter_mut().find(|(g, _)| *g == draw.grant_id) {
                *amount -= draw.amount.micros();
            }
        }
        lease.overdraft -= entry.overdraft.micros();
        let a = self.account(&settlement.account);
        let record = UsageRecord {
            id: UsageId(String::new()),
            kind: UsageKind::Debit,
            account: settlement.account.clone(),
            key: key.clone(),
            feature: entry.feature.clone(),
            at: entry.at,
            cost: entry.cost(),
            draws: entry.draws.clone(),
            overdraft: entry.overdraft,
            pool: Credits::from_micros(a.pool()),
            overdraft_room: Credits::from_micros(a.od_limit - a.od_used),
            actor: entry.actor.clone(),
            price: entry.price,
            hold_id: None,
            lease_id: Some(settlement.lease_id.clone()),
            seq: 0,
        };
        let allowed = Allowed {
            draws: entry.draws.clone(),
            overdraft: entry.overdraft,
            pool: record.pool,
            overdraft_room: record.overdraft_room,
            usage_id: UsageId(String::new()),
            at: entry.at,
            replayed: false,
            price: Some(entry.price),
            moves: None,
        };
        let usage_id = self.append(record, now);
        let stored = Stored::Debit(
            Allowed {
                usage_id: usage_id.clone(),
                ..allowed
            },
            entry.feature.clone(),
            entry.price,
            Some(settlement.lease_id.clone()),
        );
        self.account(&settlement.account)
            .remember(key, fingerprint, stored, now, retain_ms);
        usage_id
    }
}

/// What an idempotency key remembers, for an entry settled now.
enum Seen {
    Nothing,
    /// A different request.
    Other,
    /// This very decision, charged by an earlier settlement whose reply was lost.
    Same(UsageId),
    /// The same request, decided again.
    Again,
}

fn refusal_of_state(state: HoldState) -> HoldRefusal {
    match state {
        HoldState::Captured => HoldRefusal::AlreadyCaptured,
        HoldState::Released => HoldRefusal::AlreadyReleased,
        HoldState::Expired | HoldState::Pending => HoldRefusal::Expired,
    }
}

impl RegionStore for MemoryRegionStore {
    fn retain_ms(&self) -> i64 {
        self.with(|state| state.retain_ms)
    }

    async fn install_segment(
        &self,
        account: &AccountId,
        key: &IdempotencyKey,
        segment: &SegmentSpec,
        now: Timestamp,
    ) -> Result<SegmentInstalled> {
        check_amount("amount", segment.amount)?;
        let fingerprint = crate::install_fingerprint(segment);
        self.with(|state| {
            let retain_ms = state.retain_ms;
            let a = state.account(account);
            if let Some(stored) = a.recall(key, &fingerprint, now.millis()) {
                return match stored? {
                    Stored::Install(done) => Ok(SegmentInstalled {
                        replayed: true,
                        ..done
                    }),
                    _ => Err(RegionError::IdempotencyConflict),
                };
            }
            a.sweep(now.millis(), retain_ms);
            let pool = a.pool();
            if pool + segment.amount.micros() > REGION_MICROS_MAX {
                return Err(RegionError::PoolFull {
                    pool: Credits::from_micros(pool),
                });
            }
            a.retired.remove(&segment.grant_id);
            let entry = a
                .segments
                .entry(segment.grant_id.clone())
                .or_insert(SegmentEntry {
                    remaining: 0,
                    priority: segment.priority,
                    effective_at: segment.effective_at,
                    expires_at: segment.expires_at,
                    scope: segment.scope.clone(),
                });
            entry.priority = segment.priority;
            entry.effective_at = segment.effective_at;
            entry.expires_at = segment.expires_at;
            entry.scope = segment.scope.clone();
            entry.remaining += segment.amount.micros();
            if segment.amount.is_positive() {
                a.moves += 1;
            }
            let done = SegmentInstalled {
                remaining: Credits::from_micros(entry.remaining),
                pool: Credits::from_micros(pool + segment.amount.micros()),
                replayed: false,
            };
            a.remember(
                key,
                fingerprint,
                Stored::Install(done.clone()),
                now.millis(),
                retain_ms,
            );
            Ok(done)
        })
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
        check_amount("amount", amount)?;
        let fingerprint = crate::take_back_fingerprint(grant_id, amount, reconciled);
        self.with(|state| {
            let retain_ms = state.retain_ms;
            let a = state.account(account);
            if let Some(stored) = a.recall(key, &fingerprint, now.millis()) {
                return match stored? {
                    Stored::TakeBack(done) => Ok(TakenBack {
                        replayed: true,
                        ..done
                    }),
                    _ => Err(RegionError::IdempotencyConflict),
                };
            }
            a.sweep(now.millis(), retain_ms);
            let unreconciled = reconciled.map_or(0, |n| a.usage_seq.saturating_sub(n));
            let held = a.segments.get(grant_id).map_or(0, |s| s.remaining);
            let taken = if unreconciled == 0 {
                held.min(amount.micros()).max(0)
            } else {
                0
            };
            let remaining = if taken > 0 {
                a.moves += 1;
                a.add_to_segment(grant_id, -taken)
            } else {
                held
            };
            let done = TakenBack {
                taken: Credits::from_micros(taken),
                remaining: Credits::from_micros(remaining),
                pool: Credits::from_micros(a.pool()),
                unreconciled,
                replayed: false,
            };
            a.remember(
                key,
                fingerprint,
                Stored::TakeBack(done.clone()),
                now.millis(),
                retain_ms,
            );
            Ok(done)
        })
    }

    async fn set_overdraft_limit(
        &self,
        account: &AccountId,
        limit: Credits,
        now: Timestamp,
    ) -> Result<()> {
        check_amount("overdraft_limit", limit)?;
        self.with(|state| {
            let retain_ms = state.retain_ms;
            let a = state.account(account);
            a.sweep(now.millis(), retain_ms);
            if a.od_limit != limit.micros() {
                a.od_limit = limit.micros();
                a.moves += 1;
            }
            Ok(())
        })
    }

    async fn set_rate_limit(
        &self,
        account: &AccountId,
        feature: &FeatureKey,
        limit: Option<RateLimit>,
        now: Timestamp,
    ) -> Result<()> {
        if let Some(limit) = &limit {
            crate::check_rate_limit(limit)?;
        }
        self.with(|state| {
            let retain_ms = state.retain_ms;
            let a = state.account(account);
            a.sweep(now.millis(), retain_ms);
            match limit {
                Some(limit) => {
                    a.limits.insert(
                        feature.clone(),
                        (
                            limit.amount.micros(),
                            limit.period.millis(),
                            limit.burst.micros(),
                        ),
                    );
                }
                None => {
                    a.limits.remove(feature);
                    a.buckets.remove(feature);
                }
            }
            Ok(())
        })
    }

    async fn debit(&self, command: &DebitCommand) -> Result<DebitOutcome> {
        check_amount("cost", command.cost)?;
        let fingerprint = debit_fingerprint(&command.feature, command.cost, &command.price);
        let now = command.now.millis();
        self.with(|state| {
            let retain_ms = state.retain_ms;
            let a = state.account(&command.account);
            if let Some(stored) = a.recall(&command.key, &fingerprint, now) {
                return match stored? {
                    Stored::Debit(allowed, ..) => Ok(DebitOutcome::Allowed(Allowed {
                        replayed: true,
                        ..allowed
                    })),
                    _ => Err(RegionError::IdempotencyConflict),
                };
            }
            a.sweep(now, retain_ms);
            let (draws, overdraft) = if command.forced {
                a.spend_forced(&command.feature, command.now, command.cost.micros())
            } else {
                match a.spend(&command.feature, command.now, command.cost.micros()) {
                    Ok(spent) => spent,
                    Err(refusal) => return Ok(DebitOutcome::Refused(refusal)),
                }
            };
            let pool = a.active_pool(command.now);
            let od_room = (a.od_limit - a.od_used).max(0);
            let record = UsageRecord {
                id: UsageId(String::new()),
                kind: UsageKind::Debit,
                account: command.account.clone(),
                key: command.key.clone(),
                feature: command.feature.clone(),
                at: command.now,
                cost: command.cost,
                draws: draws_of(&draws),
                overdraft: Credits::from_micros(overdraft),
                pool: Credits::from_micros(pool),
                overdraft_room: Credits::from_micros(od_room),
                actor: command.actor.clone(),
                price: command.price,
                hold_id: None,
                lease_id: None,
                seq: 0,
            };
            let allowed = Allowed {
                draws: record.draws.clone(),
                overdraft: record.overdraft,
                pool: record.pool,
                overdraft_room: record.overdraft_room,
                usage_id: UsageId(String::new()),
                at: command.now,
                replayed: false,
                price: Some(command.price),
                moves: None,
            };
            let usage_id = state.append(record, now);
            let allowed = Allowed {
                usage_id,
                ..allowed
            };
            let a = state.account(&command.account);
            a.remember(
                &command.key,
                fingerprint,
                Stored::Debit(
                    allowed.clone(),
                    command.feature.clone(),
                    command.price,
                    None,
                ),
                now,
                retain_ms,
            );
            Ok(DebitOutcome::Allowed(Allowed {
                moves: Some(a.moves),
                ..allowed
            }))
        })
    }

    async fn authorize(&self, command: &AuthorizeCommand) -> Result<AuthorizeOutcome> {
        check_amount("cost", command.cost)?;
        let fingerprint = crate::authorize_fingerprint(command);
        let now = command.now.millis();
        self.with(|state| {
            let retain_ms = state.retain_ms;
            let a = state.account(&command.account);
            if let Some(stored) = a.recall(&command.key, &fingerprint, now) {
                return match stored? {
                    Stored::Hold(placed) => Ok(AuthorizeOutcome::Held(HoldPlaced {
                        replayed: true,
                        ..placed
                    })),
                    _ => Err(RegionError::IdempotencyConflict),
                };
            }
            a.sweep(now, retain_ms);
            if a.holds.contains_key(&command.hold_id) {
                return Err(RegionError::HoldExists);
            }
            let cost = command.cost.micros();
            let (draws, overdraft) = match a.spend(&command.feature, command.now, cost) {
                Ok(spent) => spent,
                Err(refusal) => return Ok(AuthorizeOutcome::Refused(refusal)),
            };
            let expires_at = command.expires_at.millis();
            a.holds.insert(
                command.hold_id.clone(),
                HoldEntry {
                    state: HoldState::Pending,
                    expires_at,
                    created_at: command.now,
                    feature: command.feature.clone(),
                    amount: cost,
                    overdraft,
                    draws: draws.clone(),
                    price: command.price,
                    actor: command.actor.clone(),
                },
            );
            a.hold_due.insert((expires_at, command.hold_id.clone()));
            let placed = HoldPlaced {
                draws: draws_of(&draws),
                overdraft: Credits::from_micros(overdraft),
                expires_at: command.expires_at,
                replayed: false,
            };
            a.remember(
                &command.key,
                fingerprint,
                Stored::Hold(placed.clone()),
                now,
                retain_ms,
            );
            Ok(AuthorizeOutcome::Held(placed))
        })
    }

    async fn capture(&self, command: &CaptureCommand) -> Result<CaptureOutcome> {
        if let Some(amount) = command.amount {
            check_amount("amount", amount)?;
        }
        let fingerprint = crate::capture_fingerprint(command);
        let now = command.now.millis();
        self.with(|state| {
            let retain_ms = state.retain_ms;
            let a = state.account(&command.account);
            if let Some(stored) = a.recall(&command.key, &fingerprint, now) {
                return match stored? {
                    Stored::Capture(captured) => Ok(CaptureOutcome::Captured(Captured {
                        replayed: true,
                        ..captured
                    })),
                    _ => Err(RegionError::IdempotencyConflict),
                };
            }
            a.sweep(now, retain_ms);
            let Some(hold) = a.holds.get(&command.hold_id).cloned() else {
                return Ok(CaptureOutcome::Refused(HoldRefusal::UnknownHold));
            };
            if hold.state != HoldState::Pending {
                return Ok(CaptureOutcome::Refused(refusal_of_state(hold.state)));
            }
            if now >= hold.expires_at {
                a.give_back(&hold.draws, hold.overdraft);
                a.end_hold(&command.hold_id, HoldState::Expired, now, retain_ms);
                return Ok(CaptureOutcome::Refused(HoldRefusal::Expired));
            }
            let amount = command.amount.map_or(hold.amount, Credits::micros);
            if amount > hold.amount {
                return Ok(CaptureOutcome::Refused(HoldRefusal::ExceedsHold {
                    held: Credits::from_micros(hold.amount),
                }));
            }
            let mut left = amount;
            let (mut taken, mut rest) = (Vec::new(), Vec::new());
            for (grant, drawn) in &hold.draws {
                let take = left.min(*drawn);
                left -= take;
                if take > 0 {
                    taken.push((grant.clone(), take));
                }
                if drawn - take > 0 {
                    rest.push((grant.clone(), drawn - take));
                }
            }
            let od_taken = left.min(hold.overdraft);
            a.give_back(&rest, hold.overdraft - od_taken);
            a.end_hold(&command.hold_id, HoldState::Captured, now, retain_ms);
            let record = UsageRecord {
                id: UsageId(String::new()),
                kind: UsageKind::Capture,
                account: command.account.clone(),
                key: command.key.clone(),
                feature: hold.feature.clone(),
                at: hold.created_at,
                cost: Credits::from_micros(amount),
                draws: draws_of(&taken),
                overdraft: Credits::from_micros(od_taken),
                pool: Credits::from_micros(a.pool()),
                overdraft_room: Credits::from_micros(a.od_limit - a.od_used),
                actor: hold.actor.clone(),
                price: PriceTag {
                    // Less than the hold taken is not a whole number of the authorized units:
                    // only the rate stays (as in `capture.lua`).
                    quantity: hold.price.quantity.filter(|_| amount == hold.amount),
                    ..hold.price
                },
                hold_id: Some(command.hold_id.clone()),
                lease_id: None,
                seq: 0,
            };
            let draws = record.draws.clone();
            let usage_id = state.append(record, now);
            let captured = Captured {
                draws,
                overdraft: Credits::from_micros(od_taken),
                released: Credits::from_micros(hold.amount - amount),
                usage_id,
                replayed: false,
            };
            let a = state.account(&command.account);
            a.remember(
                &command.key,
                fingerprint,
                Stored::Capture(captured.clone()),
                now,
                retain_ms,
            );
            Ok(CaptureOutcome::Captured(captured))
        })
    }

    async fn release(&self, command: &ReleaseCommand) -> Result<ReleaseOutcome> {
        let fingerprint = crate::release_fingerprint(&command.hold_id);
        let now = command.now.millis();
        self.with(|state| {
            let retain_ms = state.retain_ms;
            let a = state.account(&command.account);
            if let Some(stored) = a.recall(&command.key, &fingerprint, now) {
                return match stored? {
                    Stored::Release(amount) => Ok(ReleaseOutcome::Released {
                        amount,
                        replayed: true,
                    }),
                    _ => Err(RegionError::IdempotencyConflict),
                };
            }
            a.sweep(now, retain_ms);
            let Some(hold) = a.holds.get(&command.hold_id).cloned() else {
                return Ok(ReleaseOutcome::Refused(HoldRefusal::UnknownHold));
            };
            if hold.state != HoldState::Pending {
                return Ok(ReleaseOutcome::Refused(refusal_of_state(hold.state)));
            }
            a.give_back(&hold.draws, hold.overdraft);
            if now >= hold.expires_at {
                a.end_hold(&command.hold_id, HoldState::Expired, now, retain_ms);
                return Ok(ReleaseOutcome::Refused(HoldRefusal::Expired));
            }
            a.end_hold(&command.hold_id, HoldState::Released, now, retain_ms);
            let amount = Credits::from_micros(hold.amount);
            a.remember(
                &command.key,
                fingerprint,
                Stored::Release(amount),
                now,
                retain_ms,
            );
            Ok(ReleaseOutcome::Released {
                amount,
                replayed: false,
            })
        })
    }

    async fn reverse(&self, command: &ReverseCommand) -> Result<ReverseOutcome> {
        let fingerprint = crate::reverse_fingerprint(&command.debit_key);
        let now = command.now.millis();
        self.with(|state| {
            let retain_ms = state.retain_ms;
            let a = state.account(&command.account);
            if let Some(stored) = a.recall(&command.key, &fingerprint, now) {
                return match stored? {
                    Stored::Reverse(amount, usage_id) => Ok(ReverseOutcome::Reversed {
                        amount,
                        usage_id,
                        replayed: true,
                    }),
                    _ => Err(RegionError::IdempotencyConflict),
                };
            }
            a.sweep(now, retain_ms);
            let Some(debit) = a
                .remembered
                .get(&command.debit_key)
                .filter(|r| now < r.forget_at)
            else {
                return Ok(ReverseOutcome::Refused(ReverseRefusal::UnknownDebit));
            };
            let Stored::Debit(allowed, feature, price, _) = debit.result.clone() else {
                return Ok(ReverseOutcome::Refused(ReverseRefusal::UnknownDebit));
            };
            if debit.reversed {
                return Ok(ReverseOutcome::Refused(ReverseRefusal::AlreadyReversed));
            }
            if now - allowed.at.millis() > command.window_ms {
                return Ok(ReverseOutcome::Refused(ReverseRefusal::WindowClosed));
            }
            let draws: Vec<(GrantId, i64)> = allowed
                .draws
                .iter()
                .map(|d| (d.grant_id.clone(), d.amount.micros()))
                .collect();
            a.give_back(&draws, allowed.overdraft.micros());
            if let Some(debit) = a.remembered.get_mut(&command.debit_key) {
                debit.reversed = true;
            }
            let amount = Credits::from_micros(
                draws.iter().map(|(_, x)| x).sum::<i64>() + allowed.overdraft.micros(),
            );
            let record = UsageRecord {
                id: UsageId(String::new()),
                kind: UsageKind::Reverse,
                account: command.account.clone(),
                key: command.debit_key.clone(),
                feature,
                at: command.now,
                cost: amount,
                draws: allowed.draws.clone(),
                overdraft: allowed.overdraft,
                pool: Credits::from_micros(a.pool()),
                overdraft_room: Credits::from_micros(a.od_limit - a.od_used),
                actor: None,
                price,
                hold_id: None,
                lease_id: None,
                seq: 0,
            };
            let usage_id = state.append(record, now);
            let a = state.account(&command.account);
            a.remember(
                &command.key,
                fingerprint,
                Stored::Reverse(amount, usage_id.clone()),
                now,
                retain_ms,
            );
            Ok(ReverseOutcome::Reversed {
                amount,
                usage_id,
                replayed: false,
            })
        })
    }

    async fn take_lease(&self, request: &LeaseRequest) -> Result<Lease> {
        check_amount("amount", request.amount)?;
        let fingerprint = crate::lease_fingerprint(request);
        let now = request.now.millis();
        self.with(|state| {
            let retain_ms = state.retain_ms;
            let a = state.account(&request.account);
            if let Some(stored) = a.recall(&request.key, &fingerprint, now) {
                return match stored? {
                    Stored::Lease(lease) => Ok(Lease {
                        replayed: true,
                        ..lease
                    }),
                    _ => Err(RegionError::IdempotencyConflict),
                };
            }
            a.sweep(now, retain_ms);
            let mut lease = a.leases.get(&request.lease_id).cloned().unwrap_or_default();
            if let Some(due) = a.leases.get(&request.lease_id).map(|l| l.expires_at) {
                a.lease_due.remove(&(due, request.lease_id.clone()));
            }
            lease.expires_at = lease.expires_at.max(request.expires_at.millis());
            // A lease takes from every active segment whatever its scope, in burn-down order.
            let mut eligible: Vec<(GrantId, SegmentEntry)> = a
                .segments
                .iter()
                .filter(|(_, s)| active(s, request.now) && s.remaining > 0)
                .map(|(id, s)| (id.clone(), s.clone()))
                .collect();
            eligible.sort_by(|(a_id, a), (b_id, b)| {
                burn_key_order(
                    (a.priority, a.expires_at, a.effective_at, a_id),
                    (b.priority, b.expires_at, b.effective_at, b_id),
                )
            });
            let mut left = request.amount.micros();
            for (id, segment) in eligible {
                if left == 0 {
                    break;
                }
                let take = left.min(segment.remaining);
                left -= take;
                a.add_to_segment(&id, -take);
                match lease.slices.iter_mut().find(|(g, _)| *g == id) {
                    Some((_, amount)) => *amount += take,
                    None => lease.slices.push((id, take)),
                }
            }
            let od_take = left.min((a.od_limit - a.od_used).max(0));
            a.od_used += od_take;
            lease.overdraft += od_take;
            left -= od_take;
            lease.slices.retain(|(_, amount)| *amount > 0);
            a.lease_due
                .insert((lease.expires_at, request.lease_id.clone()));
            let slices = lease
                .slices
                .iter()
                .filter_map(|(id, amount)| {
                    let s = a.segment_terms(id)?;
                    Some(Segment {
                        grant_id: id.clone(),
                        remaining: Credits::from_micros(*amount),
                        priority: s.priority,
                        effective_at: s.effective_at,
                        expires_at: s.expires_at,
                        scope: s.scope.clone(),
                    })
                })
                .collect();
            let granted = Lease {
                granted: Credits::from_micros(request.amount.micros() - left),
                overdraft: Credits::from_micros(lease.overdraft),
                expires_at: Timestamp::from_millis(lease.expires_at)
                    .map_err(|e| RegionError::Corrupt(e.to_string()))?,
                slices,
                replayed: false,
            };
            a.leases.insert(request.lease_id.clone(), lease);
            a.remember(
                &request.key,
                fingerprint,
                Stored::Lease(granted.clone()),
                now,
                retain_ms,
            );
            Ok(granted)
        })
    }

    async fn settle_lease(&self, settlement: &LeaseSettlement) -> Result<SettleOutcome> {
        if settlement.entries.len() > LEASE_SETTLE_ENTRIES_MAX {
            return Err(RegionError::TooManyEntries {
                count: settlement.entries.len(),
            });
        }
        for entry in &settlement.entries {
            check_amount("cost", entry.cost())?;
        }
        let now = settlement.now.millis();
        self.with(|state| {
            let retain_ms = state.retain_ms;
            let a = state.account(&settlement.account);
            a.sweep(now, retain_ms);
            let Some(mut lease) = a.leases.get(&settlement.lease_id).cloned() else {
                return Ok(SettleOutcome::NoLease);
            };
            // Keys written by this call: an entry repeated within one settlement is decided
            // again, never a resend of an earlier call.
            let mut written = HashSet::new();
            let statuses = settlement
                .entries
                .iter()
                .map(|entry| {
                    state.settle_entry(settlement, entry, &mut lease, &mut written, now, retain_ms)
                })
                .collect();
            let a = state.account(&settlement.account);
            a.lease_due
                .remove(&(lease.expires_at, settlement.lease_id.clone()));
            lease.expires_at = lease.expires_at.max(settlement.expires_at.millis());
            lease.slices.retain(|(_, amount)| *amount > 0);
            a.lease_due
                .insert((lease.expires_at, settlement.lease_id.clone()));
            a.leases.insert(settlement.lease_id.clone(), lease);
            Ok(SettleOutcome::Settled(statuses))
        })
    }

    async fn return_lease(
        &self,
        account: &AccountId,
        lease_id: &LeaseId,
        now: Timestamp,
    ) -> Result<Credits> {
        self.with(|state| {
            let retain_ms = state.retain_ms;
            let a = state.account(account);
            a.sweep(now.millis(), retain_ms);
            let Some(lease) = a.leases.remove(lease_id) else {
                return Ok(Credits::ZERO);
            };
            a.lease_due.remove(&(lease.expires_at, lease_id.clone()));
            a.give_back(&lease.slices, lease.overdraft);
            let total =
                lease.slices.iter().map(|(_, amount)| amount).sum::<i64>() + lease.overdraft;
            Ok(Credits::from_micros(total))
        })
    }

    async fn view(&self, account: &AccountId, now: Timestamp) -> Result<AccountView> {
        self.with(|state| {
            let retain_ms = state.retain_ms;
            let a = state.account(account);
            a.sweep(now.millis(), retain_ms);
            let pending: Vec<&HoldEntry> = a
                .holds
                .values()
                .filter(|h| h.state == HoldState::Pending)
                .collect();
            let leased: i64 = a
                .leases
                .values()
                .map(|l| l.overdraft + l.slices.iter().map(|(_, x)| x).sum::<i64>())
                .sum();
            Ok(AccountView {
                segments: a
                    .segments
                    .iter()
                    .map(|(id, s)| Segment {
                        grant_id: id.clone(),
                        remaining: Credits::from_micros(s.remaining),
                        priority: s.priority,
                        effective_at: s.effective_at,
                        expires_at: s.expires_at,
                        scope: s.scope.clone(),
                    })
                    .collect(),
                overdraft_limit: Credits::from_micros(a.od_limit),
                overdraft_used: Credits::from_micros(a.od_used),
                held: Credits::from_micros(pending.iter().map(|h| h.amount).sum()),
                holds_pending: pending.len() as u64,
                held_grants: pending
                    .iter()
                    .flat_map(|h| h.draws.iter())
                    .filter(|(_, amount)| *amount > 0)
                    .map(|(grant, _)| grant.clone())
                    .collect::<std::collections::BTreeSet<_>>()
                    .into_iter()
                    .collect(),
                leased: Credits::from_micros(leased),
                leases: a.leases.len() as u64,
                usage_seq: a.usage_seq,
                moves: a.moves,
            })
        })
    }

    async fn create_usage_group(&self, group: &str) -> Result<()> {
        self.with(|state| {
            state.groups.entry(group.to_string()).or_default();
            Ok(())
        })
    }

    async fn read_usage(
        &self,
        group: &str,
        consumer: &str,
        max: usize,
    ) -> Result<Vec<UsageRecord>> {
        Ok(self.read_usage_to_end(group, consumer, max).await?.records)
    }

    async fn read_usage_to_end(
        &self,
        group: &str,
        consumer: &str,
        max: usize,
    ) -> Result<UsageRead> {
        let max = max.min(USAGE_READ_MAX);
        self.with(|state| {
            let State { stream, groups, .. } = state;
            let group = groups.get_mut(group).ok_or_else(|| {
                RegionError::Redis(format!("NOGROUP no such consumer group {group}"))
            })?;
            let mine: Vec<u64> = group
                .pending
                .iter()
                .filter(|(_, c)| c.as_str() == consumer)
                .map(|(seq, _)| *seq)
                .take(max)
                .collect();
            if !mine.is_empty() {
                let records = stream
                    .iter()
                    .filter(|(seq, _)| mine.contains(seq))
                    .map(|(_, r)| r.clone())
                    .collect();
                return Ok(UsageRead {
                    records,
                    at_end: false,
                });
            }
            let fresh: Vec<(u64, UsageRecord)> = stream
                .iter()
                .filter(|(seq, _)| *seq >= group.next)
                .take(max)
                .cloned()
                .collect();
            for (seq, _) in &fresh {
                group.pending.insert(*seq, consumer.to_string());
                group.next = seq + 1;
            }
            let at_end = fresh.len() < max.max(1);
            Ok(UsageRead {
                records: fresh.into_iter().map(|(_, r)| r).collect(),
                at_end,
            })
        })
    }

    async fn ack_usage(&self, group: &str, ids: &[UsageId]) -> Result<u64> {
        self.with(|state| {
            let State { stream, groups, .. } = state;
            let Some(group) = groups.get_mut(group) else {
                return Ok(0);
            };
            let mut acked = 0;
            for id in ids {
                if let Some(position) = stream.iter().position(|(_, r)| r.id == *id) {
                    let (seq, _) = stream[position];
                    if group.pending.remove(&seq).is_some() {
                        acked += 1;
                    }
                    stream.remove(position);
                }
            }
            Ok(acked)
        })
    }

    async fn usage_backlog(&self) -> Result<Option<UsageBacklog>> {
        self.with(|state| {
            Ok(Some(UsageBacklog {
                records: state.stream.len() as u64,
                oldest_appended_ms: state
                    .stream
                    .front()
                    .and_then(|(_, record)| crate::usage_id_millis(&record.id.0)),
            }))
        })
    }

    async fn publish_price_book(&self, book: &tollgate_core::PriceBook) -> Result<u64> {
        self.with(|state| {
            let generation = state.price_book.as_ref().map_or(0, |p| p.generation) + 1;
            state.price_book = Some(PublishedPriceBook {
                generation,
                book: book.clone(),
            });
            state.notify(Change::PriceBook);
            Ok(generation)
        })
    }

    async fn price_book_generation(&self) -> Result<u64> {
        self.with(|state| Ok(state.price_book.as_ref().map_or(0, |p| p.generation)))
    }

    async fn load_price_book(&self) -> Result<Option<PublishedPriceBook>> {
        self.with(|state| Ok(state.price_book.clone()))
    }

    async fn publish_account(&self, summary: &AccountSummary) -> Result<()> {
        self.with(|state| {
            let region_moves = state.accounts.get(&summary.account).map_or(0, |a| a.moves);
            state.summaries.insert(
                summary.account.clone(),
                AccountSummary {
                    region_moves,
                    ..summary.clone()
                },
            );
            state.notify(Change::Account(summary.account.clone()));
            Ok(())
        })
    }

    async fn account_summary(&self, account: &AccountId) -> Result<Option<AccountSummary>> {
        self.with(|state| Ok(state.summaries.get(account).cloned()))
    }

    async fn recall_leases(&self, account: &AccountId) -> Result<()> {
        self.with(|state| {
            state.notify(Change::Recall(account.clone()));
            Ok(())
        })
    }

    async fn watch_changes(&self) -> Result<tokio::sync::mpsc::Receiver<Change>> {
        let (sender, receiver) = tokio::sync::mpsc::channel(crate::CHANGE_CHANNEL_CAPACITY);
        self.with(|state| state.watchers.push(sender));
        Ok(receiver)
    }
}

fn lease_problem(lease: &LeaseEntry, entry: &LeaseUsage) -> Option<String> {
    let mut problem = None;
    for draw in &entry.draws {
        let available = lease
            .slices
            .iter()
            .find(|(g, _)| *g == draw.grant_id)
            .map(|(_, amount)| *amount);
        if available.is_none_or(|available| available < draw.amount.micros()) {
            problem = Some(format!("draw exceeds lease slice {}", draw.grant_id));
        }
    }
    if entry.overdraft.micros() > lease.overdraft {
        problem = Some("overdraft exceeds the lease".to_string());
    }
    problem
}
