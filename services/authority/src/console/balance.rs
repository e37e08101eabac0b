//! The console's reads of the account's balance; the figure itself is told in
//! `crate::balance`, the one place Admin `GetBalance`, the console and the widget share.

pub use crate::balance::{held_in, AccountBalance, GrantAside};

use tollgate_core::{AccountId, Credits, RegionId};
use tollgate_region::AccountView;

use super::{Console, Failure};

impl Console {
    /// What each region holds for the account now (none without an authority).
    pub(super) async fn region_views(
        &self,
        account: &AccountId,
    ) -> Vec<(RegionId, Result<AccountView, String>)> {
        crate::balance::region_views(self.lifecycle.as_deref(), account).await
    }

    /// The account's balance from the ledger alone (its grants and debt), before holds.
    pub(super) async fn ledger_balance(
        &self,
        account: &AccountId,
        debt: Credits,
    ) -> Result<AccountBalance, Failure> {
        let now = self.clock.now();
        Ok(crate::balance::from_ledger(self.ledger.as_ref(), account, debt, now).await?)
    }

    /// The account's balance now: the ledger's grants and debt, less the regions' holds.
    pub(super) async fn account_balance(
        &self,
        account: &AccountId,
    ) -> Result<AccountBalance, Failure> {
        let now = self.clock.now();
        let regions = self.lifecycle.as_deref();
        let (_, balance) =
            crate::balance::read(self.ledger.as_ref(), regions, account, now).await?;
        Ok(balance)
    }
}
