//! Features and price book versions: stored by the authority and published, whole, into every
//! region, where edges pick them up within a second.

use tollgate_core::{PriceBook, PriceBookVersion};
use tollgate_ledger::LedgerStore;
use tollgate_region::RegionStore;

use crate::authority::Authority;
use crate::error::{AuthorityError, Result};
use crate::state::Feature;

impl<L: LedgerStore + ?Sized, R: RegionStore> Authority<L, R> {
    /// Defines a feature; defining the same feature again is a replay, differently a conflict.
    pub async fn define_feature(&self, feature: &Feature) -> Result<()> {
        self.state.define_feature(feature).await.map(|_| ())
    }

    /// Stores a price book version (immutable: the same number again must be the same
    /// version) and publishes the whole book to every region.
    /// Refused as a whole, every problem named, when it prices features never defined or
    /// overrides plans that do not exist.
    pub async fn publish_price_version(&self, version: &PriceBookVersion) -> Result<()> {
        crate::plans::refuse(self.price_version_problems(version).await?)?;
        self.state.put_price_version(version).await?;
        self.publish_price_books().await
    }

    /// Publishes every stored version to every region (at start, and after each change).
    pub async fn publish_price_books(&self) -> Result<()> {
        let book = PriceBook::new(self.state.price_versions().await?);
        for (region, store) in &self.regions {
            store
                .publish_price_book(&book)
                .await
                .map_err(|e| AuthorityError::region(region, e))?;
        }
        Ok(())
    }
}
