//! Closing a grant before its time (an operator's void, a refunded purchase): its credits are
//! taken back from every region before the ledger closes them, so no edge goes on spending
//! credits the ledger no longer has, and what the void closes (and the money a refund owes) is
//! what was really left.
//!
//! While a grant closes it is never handed out again. Every region gives back what its
//! segments hold of it, every edge is asked to return its lease, and each region's usage is
//! reconciled, until no region holds any of it: then the ledger closes the remainder. Credits
//! still under a pending hold, on the lease of an edge that does not answer, or in a region
//! that cannot be reached keep the grant open and the call is refused, saying which and what
//! to do; nothing is closed then.

use std::time::{Duration, Instant};

use async_trait::async_trait;
use tollgate_core::command::CloseGrant;
use tollgate_core::{AccountId, GrantId, GrantState, RegionId, Timestamp};
use tollgate_ledger::{LedgerStore, Outcome};
use tollgate_region::RegionStore;

use crate::{Authority, AuthorityError, Result};

/// How long a close waits for the regions to give back every credit of the grant.
pub const CLOSE_WAIT_MS: u64 = 5_000;
/// How often it looks again meanwhile.
const CLOSE_POLL_MS: u64 = 50;

/// Closes a grant (void or expiry by an operator). The authority takes the grant's credits
/// back from its regions first; a ledger on its own (no regions to take back from) closes it
/// directly.
#[async_trait]
pub trait GrantCloser: Send + Sync {
    async fn close_grant(&self, command: CloseGrant, now: Timestamp) -> Result<Outcome>;
}

/// A ledger with no regions attached: nothing is out to take back.
pub struct LedgerCloser<'a>(pub &'a dyn LedgerStore);

#[async_trait]
impl GrantCloser for LedgerCloser<'_> {
    async fn close_grant(&self, command: CloseGrant, now: Timestamp) -> Result<Outcome> {
        Ok(self.0.close_grant(command, now).await?)
    }
}

#[async_trait]
impl<L: LedgerStore + ?Sized, R: RegionStore> GrantCloser for Authority<L, R> {
    async fn close_grant(&self, command: CloseGrant, _now: Timestamp) -> Result<Outcome> {
        self.close_grant_everywhere(command).await
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
        for region in &regions {
            self.region(region)?
                .recall_leases(account)
                .await
                .map_err(|e| unreachable_region(region, grant, &e))?;
        }
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
            for region in &regions {
                self.reconcile_once(region)
                    .await
                    .map_err(|e| region_busy(e, grant))?;
            }
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

    /// Why a close is refused with credits still out: pending holds need the operator (capture,
    /// release, or their expiry); a lease not returned yet only needs a retry.
    async fn still_out(
        &self,
        account: &AccountId,
        grant: &GrantId,
        out: &[(String, i64)],
    ) -> AuthorityError {
        let now = self.clock.now();
        // Pending holds drawing on this grant (each region's view names the grants its holds
        // draw on).
        let mut holds = 0;
        for store in self.regions.values() {
            if let Ok(view) = store.view(account, now).await {
                if view.held_grants.contains(grant) {
                    holds += view.holds_pending;
                }
            }
        }
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
