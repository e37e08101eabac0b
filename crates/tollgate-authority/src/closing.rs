//! Taking credits away before their time (an operator's void, a refunded purchase, a negative
//! adjustment): they are taken back from every region before the ledger closes or shrinks
//! them, so no edge goes on spending credits the ledger no longer has, and what the void closes
//! (and the money a refund owes) is what was really left.
//!
//! While a grant closes it is never handed out again. Every region gives back what its
//! segments hold of it, every edge is asked to return its lease, and each region's usage is
//! reconciled, until no region holds any of it: then the ledger closes the remainder. Credits
//! still under a pending hold, on the lease of an edge that does not answer, or in a region
//! that cannot be reached keep the grant open and the call is refused, saying which and what
//! to do; nothing is closed then.
//!
//! A negative adjustment takes its credits from the account's grants in burn-down order. What
//! it takes of a grant beyond what no region holds is taken back from the regions first (the
//! same way, and only that much: the rest of the grant's credits stay where they are). Credits
//! that stay out (a lease not returned yet, a pending hold) are left to the regions: the ledger
//! takes from the next grants instead, and the call is refused only when the adjustment would
//! then run into debt that those credits would have covered.

use async_trait::async_trait;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use tollgate_core::command::{Adjust, CloseGrant};
use tollgate_core::{AccountId, Credits, GrantId, GrantState, RegionId, Timestamp};
use tollgate_ledger::{LedgerStore, Outcome};
use tollgate_region::RegionStore;

use crate::{Authority, AuthorityError, Result};

/// How long a close waits for the regions to give back every credit of the grant.
pub const CLOSE_WAIT_MS: u64 = 5_000;
/// How often it looks again meanwhile.
const CLOSE_POLL_MS: u64 = 50;

/// Closes a grant (void or expiry by an operator) or takes credits away (an adjustment). The
/// authority takes the credits back from its regions first; a ledger on its own (no regions to
/// take back from) applies the command directly.
#[async_trait]
pub trait GrantCloser: Send + Sync {
    async fn close_grant(&self, command: CloseGrant, now: Timestamp) -> Result<Outcome>;
    async fn adjust(&self, command: Adjust, now: Timestamp) -> Result<Outcome>;
}

/// A ledger with no regions attached: nothing is out to take back.
pub struct LedgerCloser<'a>(pub &'a dyn LedgerStore);

#[async_trait]
impl GrantCloser for LedgerCloser<'_> {
    async fn close_grant(&self, command: CloseGrant, now: Timestamp) -> Result<Outcome> {
        Ok(self.0.close_grant(command, now).await?)
    }

    async fn adjust(&self, command: Adjust, now: Timestamp) -> Result<Outcome> {
        Ok(self.0.adjust(command, now).await?)
    }
}

#[async_trait]
impl<L: LedgerStore + ?Sized, R: RegionStore> GrantCloser for Authority<L, R> {
    async fn close_grant(&self, command: CloseGrant, _now: Timestamp) -> Result<Outcome> {
        self.close_grant_everywhere(command).await
    }

    async fn adjust(&self, command: Adjust, _now: Timestamp) -> Result<Outcome> {
        self.adjust_everywhere(command).await
    }
}

/// Marks a grant as closing for as long as it lives: allocation skips it.
struct Closing<'a, L: LedgerStore + ?Sized, R: RegionStore> {
    authority: &'a Authority<L, R>,
    key: (AccountId, GrantId),
}

impl<L: LedgerStore + ?Sized, R: RegionStore> Drop for Closing<'_, L, R> {
    fn drop(&mut self) {
        self.authority.closing_set().remove(&self.key);
    }
}

impl<L: LedgerStore + ?Sized, R: RegionStore> Authority<L, R> {
    /// Whether `grant` is being closed: no region is given any of it.
    pub(crate) fn is_closing(&self, account: &AccountId, grant: &GrantId) -> bool {
        self.closing_set()
            .contains(&(account.clone(), grant.clone()))
    }

    /// Takes the grant's credits back from every region, then has the ledger close it (see
    /// the module's documentation). A grant already closed, or unknown, goes straight to the
    /// ledger, which refuses it or replays the first answer.
    pub async fn close_grant_everywhere(&self, command: CloseGrant) -> Result<Outcome> {
        let account = command.account.clone();
        let grant = command.grant.clone();
        let open = self
            .ledger
            .grant(&account, &grant)
            .await?
            .is_some_and(|record| record.grant.state == GrantState::Open);
        if !open || self.regions.is_empty() {
            return Ok(self.ledger.close_grant(command, self.clock.now()).await?);
        }
        let mark = Closing {
            authority: self,
            key: (account.clone(), grant.clone()),
        };
        self.closing_set().insert(mark.key.clone());
        if let Err(error) = self.gather_closing(&account, &grant).await {
            drop(mark);
            // What was taken back is handed out again (the grant stays open).
            if let Err(again) = self.rebalance(&account).await {
                tracing::warn!(%account, %again, "handing credits back after a refused close failed");
            }
            return Err(error);
        }
        let outcome = self.ledger.close_grant(command, self.clock.now()).await?;
        self.forget_grant_allocations(&account, &grant).await?;
        drop(mark);
        self.mark_dirty(&account);
        // The regions gave the grant back: the account's other grants fill them up again.
        self.rebalance(&account).await?;
        Ok(outcome)
    }

    /// Until no region holds any of the grant: takes back what the regions' segments hold of
    /// it, asks the edges for their leases, and reconciles each region's usage. Refused when
    /// a region cannot be reached, or when credits are still out at the deadline.
    async fn gather_closing(&self, account: &AccountId, grant: &GrantId) -> Result<()> {
        let regions: Vec<RegionId> = self.regions.keys().cloned().collect();
        self.recall_leases_everywhere(&regions, account, grant)
            .await?;
        let deadline = Instant::now() + Duration::from_millis(CLOSE_WAIT_MS);
        loop {
            {
                let lock = self.account_lock(account);
                let _held = lock.lock().await;
                let now = self.clock.now();
                for region in &regions {
                    self.take_back_grant(region, account, grant, None, now)
                        .await
                        .map_err(|e| region_busy(e, grant))?;
                }
            }
            self.reconcile_everywhere(&regions, grant).await?;
            let out: Vec<(String, i64)> = self
                .state
                .allocations(account)
                .await?
                .into_iter()
                .filter(|row| row.grant_id == grant.as_str() && row.outstanding() > 0)
                .map(|row| (row.region.to_string(), row.outstanding()))
                .collect();
            if out.is_empty() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(self.still_out(account, grant, &out).await);
            }
            tokio::time::sleep(Duration::from_millis(CLOSE_POLL_MS)).await;
        }
    }

    /// A negative adjustment takes back from the regions what it takes of their grants' credits
    /// (see the module's documentation); a positive one only adds a grant.
    pub async fn adjust_everywhere(&self, mut command: Adjust) -> Result<Outcome> {
        let account = command.account.clone();
        if !command.amount.is_negative() || self.regions.is_empty() {
            let outcome = self.ledger.adjust(command, self.clock.now()).await?;
            self.mark_dirty(&account);
            return Ok(outcome);
        }
        let regions: Vec<RegionId> = self.regions.keys().cloned().collect();
        let deadline = Instant::now() + Duration::from_millis(CLOSE_WAIT_MS);
        // Grants whose credits are being gathered: allocation hands none of them out meanwhile.
        let mut marks: Vec<Closing<'_, L, R>> = Vec::new();
        let mut recalled = false;
        let result = loop {
            let stuck = match self.adjust_attempt(&regions, &mut command).await {
                Ok(Attempt::Applied(outcome)) => break Ok(outcome),
                Ok(Attempt::Stuck(stuck)) => stuck,
                Err(error) => break Err(error),
            };
            for (grant, _) in &stuck {
                if !marks.iter().any(|mark| &mark.key.1 == grant) {
                    let mark = Closing {
                        authority: self,
                        key: (account.clone(), grant.clone()),
                    };
                    self.closing_set().insert(mark.key.clone());
                    marks.push(mark);
                }
            }
            if Instant::now() >= deadline {
                break Err(self.adjustment_stuck(&account, &stuck).await);
            }
            let grant = &stuck[0].0;
            if !recalled {
                recalled = true;
                if let Err(error) = self
                    .recall_leases_everywhere(&regions, &account, grant)
                    .await
                {
                    break Err(error);
                }
            }
            if let Err(error) = self.reconcile_everywhere(&regions, grant).await {
                break Err(error);
            }
            tokio::time::sleep(Duration::from_millis(CLOSE_POLL_MS)).await;
        };
        drop(marks);
        self.mark_dirty(&account);
        // What was taken back and not taken away is handed out again.
        if let Err(again) = self.rebalance(&account).await {
            tracing::warn!(%account, %again, "handing credits out again after an adjustment failed");
        }
        result
    }

    /// Under the account lock: takes back from the regions what the adjustment takes of their
    /// grants, then applies it, unless credits it needs are still out.
    async fn adjust_attempt(&self, regions: &[RegionId], command: &mut Adjust) -> Result<Attempt> {
        let account = command.account.clone();
        // No region's reconciliation runs meanwhile: it commits usage to the ledger before it
        // counts it spent, and in between the counters would say the region holds credits the
        // ledger already took (the adjustment would then leave them and run into debt). Taken
        // before the account's lock, in region order, as reconciliation takes them.
        let reconciling: Vec<_> = regions
            .iter()
            .filter_map(|region| self.reconcile_lock(region))
            .collect();
        let mut _reconciling = Vec::with_capacity(reconciling.len());
        for lock in &reconciling {
            _reconciling.push(lock.lock().await);
        }
        let lock = self.account_lock(&account);
        let _held = lock.lock().await;
        let now = self.clock.now();
        let grants = self
            .ledger
            .grants_with_credits(&account, tollgate_ledger::OPEN_GRANTS_MAX)
            .await?;
        let out = self.out_by_grant(&account).await?;
        // The ledger's walk (`AccountBook::adjust_leaving`): burn-down order, each grant giving
        // what no region holds of it.
        let mut left = command.amount.micros().saturating_neg();
        let mut stuck = Vec::new();
        for grant in grants.iter().filter(|grant| grant.is_active_at(now)) {
            if left <= 0 {
                break;
            }
            let remaining = grant.remaining.micros();
            let free = (remaining - out.get(&grant.id).map_or(0, |c| c.micros())).max(0);
            let take = left.min(remaining);
            let mut got = 0;
            if take > free {
                let mut need = take - free;
                for region in regions {
                    if need <= 0 {
                        break;
                    }
                    let taken = self
                        .take_back_part(
                            region,
                            &account,
                            &grant.id,
                            Credits::from_micros(need),
                            None,
                            now,
                        )
                        .await
                        .map_err(|e| region_busy(e, &grant.id))?
                        .taken
                        .micros();
                    need -= taken;
                    got += taken;
                }
                if need > 0 {
                    stuck.push((grant.id.clone(), need));
                }
            }
            left -= take.min(free + got);
        }
        // Credits still out matter only when the adjustment would run into debt without them.
        if left > 0 && !stuck.is_empty() {
            return Ok(Attempt::Stuck(stuck));
        }
        command.out = self.out_by_grant(&account).await?;
        Ok(Attempt::Applied(
            self.ledger.adjust(command.clone(), now).await?,
        ))
    }

    /// What regions hold of each of the account's grants (allocated, neither given back nor
    /// reconciled as spent).
    async fn out_by_grant(&self, account: &AccountId) -> Result<BTreeMap<GrantId, Credits>> {
        let mut out: BTreeMap<GrantId, Credits> = BTreeMap::new();
        for row in self.state.allocations(account).await? {
            if row.outstanding() <= 0 {
                continue;
            }
            if let Ok(grant) = GrantId::new(row.grant_id.as_str()) {
                let sum = out.entry(grant).or_default();
                *sum = Credits::from_micros(sum.micros().saturating_add(row.outstanding()));
            }
        }
        Ok(out)
    }

    /// Asks every region's edges to give back their leases of the account.
    async fn recall_leases_everywhere(
        &self,
        regions: &[RegionId],
        account: &AccountId,
        grant: &GrantId,
    ) -> Result<()> {
        for region in regions {
            self.region(region)?
                .recall_leases(account)
                .await
                .map_err(|e| unreachable_region(region, grant, &e))?;
        }
        Ok(())
    }

    /// Reconciles one batch of every region, so that what edges spent and gave back reaches
    /// the ledger and the counters.
    async fn reconcile_everywhere(&self, regions: &[RegionId], grant: &GrantId) -> Result<()> {
        for region in regions {
            self.reconcile_once(region)
                .await
                .map_err(|e| region_busy(e, grant))?;
        }
        Ok(())
    }

    /// The account's pending holds in the regions whose holds draw on any of `grants` (each
    /// region's view names the grants its holds draw on); a region that does not answer counts
    /// none.
    async fn holds_drawing_on(&self, account: &AccountId, grants: &[&GrantId]) -> u64 {
        let now = self.clock.now();
        let mut holds = 0;
        for store in self.regions.values() {
            if let Ok(view) = store.view(account, now).await {
                if grants.iter().any(|grant| view.held_grants.contains(grant)) {
                    holds += view.holds_pending;
                }
            }
        }
        holds
    }

    /// Why an adjustment is refused with credits it needs still out (as [`Self::still_out`]).
    async fn adjustment_stuck(
        &self,
        account: &AccountId,
        stuck: &[(GrantId, i64)],
    ) -> AuthorityError {
        let grants: Vec<&GrantId> = stuck.iter().map(|(grant, _)| grant).collect();
        let holds = self.holds_drawing_on(account, &grants).await;
        let listed = stuck
            .iter()
            .map(|(grant, micros)| format!("{} of grant {grant}", Credits::from_micros(*micros)))
            .collect::<Vec<_>>()
            .join(", ");
        if holds > 0 {
            AuthorityError::Precondition(format!(
                "the adjustment of account {account} needs credits regions still hold under \
                 pending holds ({listed}; {holds} holds pending): capture or release them (or \
                 let them expire), or adjust by less; nothing was adjusted"
            ))
        } else {
            AuthorityError::Busy(format!(
                "the adjustment of account {account} needs credits still on edges' leases \
                 ({listed}); they were asked to give them back: retry in a few seconds; \
                 nothing was adjusted"
            ))
        }
    }

    /// Why a close is refused with credits still out: pending holds need the operator (capture,
    /// release, or their expiry); a lease not returned yet only needs a retry.
    async fn still_out(
        &self,
        account: &AccountId,
        grant: &GrantId,
        out: &[(String, i64)],
    ) -> AuthorityError {
        let holds = self.holds_drawing_on(account, &[grant]).await;
        let listed = out
            .iter()
            .map(|(region, micros)| {
                format!(
                    "{} in {region}",
                    tollgate_core::Credits::from_micros(*micros)
                )
            })
            .collect::<Vec<_>>()
            .join(", ");
        if holds > 0 {
            AuthorityError::Precondition(format!(
                "grant {grant} of account {account} still has credits out ({listed}) under \
                 pending holds (the account has {holds} in the regions holding them): capture \
                 or release them (or let them expire), then close the grant again; nothing was \
                 closed"
            ))
        } else {
            AuthorityError::Busy(format!(
                "grant {grant} of account {account} still has credits on edges' leases \
                 ({listed}); they were asked to give them back: retry in a few seconds; \
                 nothing was closed"
            ))
        }
    }
}

/// Where a negative adjustment's attempt ended.
enum Attempt {
    Applied(Outcome),
    /// Credits it needs (micro-credits per grant) are still out.
    Stuck(Vec<(GrantId, i64)>),
}

/// A region's failure while closing is a reason to retry later, said as such.
fn region_busy(error: AuthorityError, grant: &GrantId) -> AuthorityError {
    match error {
        AuthorityError::Region { region, error } => AuthorityError::Busy(format!(
            "region {region} could not give back grant {grant}'s credits ({error}); nothing \
             was closed: retry once the region answers"
        )),
        other => other,
    }
}

fn unreachable_region(
    region: &RegionId,
    grant: &GrantId,
    error: &dyn std::fmt::Display,
) -> AuthorityError {
    AuthorityError::Busy(format!(
        "region {region} could not give back grant {grant}'s credits ({error}); nothing was \
         closed: retry once the region answers"
    ))
}
