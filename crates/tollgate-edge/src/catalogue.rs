//! What the edge keeps in memory to price a request without leaving the process: the price
//! book (swapped whole, so a reader never sees half a version) and account summaries (with
//! unknown accounts remembered as unknown for a short time).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use dashmap::DashMap;
use tollgate_core::{
    AccountId, FeatureKey, PriceError, PriceQuery, RegionId, ResolvedPrice, Timestamp,
};
use tollgate_region::{AccountSummary, Change, PublishedPriceBook, RegionStore};
use tracing::{debug, warn};

use crate::clock::Clock;
use crate::error::EngineError;
use crate::settings::{EdgeSettings, ACCOUNTS_CACHED_MAX};

#[derive(Clone)]
enum Cached {
    Known {
        summary: Arc<AccountSummary>,
        loaded_at_ms: i64,
    },
    Unknown {
        until_ms: i64,
    },
}

pub struct Catalogue {
    prices: ArcSwapOption<PublishedPriceBook>,
    accounts: DashMap<AccountId, Cached>,
    region: RegionId,
    unknown_ttl_ms: i64,
    summary_ttl_ms: i64,
    /// Times the price book was swapped, for metrics and tests.
    reloads: AtomicU64,
}

impl Catalogue {
    pub fn new(settings: &EdgeSettings) -> Self {
        Catalogue {
            prices: ArcSwapOption::empty(),
            accounts: DashMap::new(),
            region: settings.region.clone(),
            unknown_ttl_ms: settings.unknown_account_ttl_ms,
            summary_ttl_ms: settings.account_summary_ttl_ms,
            reloads: AtomicU64::new(0),
        }
    }

    /// The generation of the price book in memory (0: none yet).
    pub fn price_generation(&self) -> u64 {
        self.prices.load().as_ref().map_or(0, |p| p.generation)
    }

    pub fn price_reloads(&self) -> u64 {
        self.reloads.load(Ordering::Relaxed)
    }

    /// Reads the published price book and swaps it in when it is newer.
    pub async fn reload_prices<S: RegionStore>(&self, store: &S) -> Result<(), EngineError> {
        if store.price_book_generation().await? <= self.price_generation() {
            return Ok(());
        }
        let Some(published) = store.load_price_book().await? else {
            return Ok(());
        };
        if published.generation > self.price_generation() {
            debug!(generation = published.generation, "price book reloaded");
            self.prices.store(Some(Arc::new(published)));
            self.reloads.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Prices `feature` for the account at `at`.
    pub fn price(
        &self,
        summary: &AccountSummary,
        feature: &FeatureKey,
        at: Timestamp,
    ) -> Result<ResolvedPrice, EngineError> {
        let prices = self.prices.load();
        let Some(published) = prices.as_ref() else {
            return Err(EngineError::Unavailable(
                "no price book has been published to this region".into(),
            ));
        };
        let query = PriceQuery {
            account_created_at: summary.created_at,
            plan: summary.plan.as_ref(),
            region: &self.region,
            feature,
            at,
            contract: summary.contract_at(at),
        };
        published.book.resolve(&query).map_err(|error| match error {
            PriceError::UnknownFeature(feature) => EngineError::UnknownFeature(feature),
            other => EngineError::Unavailable(other.to_string()),
        })
    }

    /// The account's summary: from memory, or read from the region (a miss is remembered).
    pub async fn account<S: RegionStore>(
        &self,
        store: &S,
        account: &AccountId,
        now: Timestamp,
    ) -> Result<Option<Arc<AccountSummary>>, EngineError> {
        let now_ms = now.millis();
        if let Some(entry) = self.accounts.get(account) {
            match &*entry {
                Cached::Known {
                    summary,
                    loaded_at_ms,
                } if now_ms - loaded_at_ms < self.summary_ttl_ms => {
                    return Ok(Some(Arc::clone(summary)));
                }
                Cached::Unknown { until_ms } if now_ms < *until_ms => return Ok(None),
                _ => {}
            }
        }
        self.load_account(store, account, now).await
    }

    /// Reads the summary from the region, whatever is cached.
    pub async fn load_account<S: RegionStore>(
        &self,
        store: &S,
        account: &AccountId,
        now: Timestamp,
    ) -> Result<Option<Arc<AccountSummary>>, EngineError> {
        let summary = store.account_summary(account).await?.map(Arc::new);
        if self.accounts.len() >= ACCOUNTS_CACHED_MAX {
            // Bounded memory: a full cache starts again rather than grow.
            warn!(
                cached = self.accounts.len(),
                "account cache full; clearing it"
            );
            self.accounts.clear();
        }
        let entry = match &summary {
            Some(summary) => Cached::Known {
                summary: Arc::clone(summary),
                loaded_at_ms: now.millis(),
            },
            None => Cached::Unknown {
                until_ms: now.millis().saturating_add(self.unknown_ttl_ms),
            },
        };
        self.accounts.insert(account.clone(), entry);
        Ok(summary)
    }

    pub fn forget_account(&self, account: &AccountId) {
        self.accounts.remove(account);
    }

    /// Keeps the catalogue current: reloads on change notices and polls the price book's
    /// generation every `poll_ms`, so a lost notice still reloads within that time.
    pub fn spawn_watcher<S: RegionStore>(
        self: &Arc<Self>,
        store: Arc<S>,
        clock: Arc<dyn Clock>,
        poll_ms: u64,
    ) -> tokio::task::JoinHandle<()> {
        let catalogue = Arc::clone(self);
        tokio::spawn(async move {
            let mut changes = match store.watch_changes().await {
                Ok(changes) => Some(changes),
                Err(error) => {
                    warn!(%error, "change notices unavailable; polling only");
                    None
                }
            };
            let mut poll = tokio::time::interval(Duration::from_millis(poll_ms.max(1)));
            loop {
                let change = match changes.as_mut() {
                    Some(receiver) => tokio::select! {
                        change = receiver.recv() => match change {
                            Some(change) => Some(change),
                            None => {
                                changes = None;
                                None
                            }
                        },
                        _ = poll.tick() => None,
                    },
                    None => {
                        poll.tick().await;
                        None
                    }
                };
                match change {
                    Some(Change::Account(account)) => {
                        if let Err(error) = catalogue
                            .load_account(store.as_ref(), &account, clock.now())
                            .await
                        {
                            warn!(%account, %error, "account summary reload failed");
                            catalogue.forget_account(&account);
                        }
                    }
                    // Recalls are the lease manager's (`Leases::spawn_recall_listener`).
                    Some(Change::Recall(_)) => {}
                    Some(Change::PriceBook) | None => {
                        if let Err(error) = catalogue.reload_prices(store.as_ref()).await {
                            warn!(%error, "price book reload failed");
                        }
                    }
                }
                if changes.is_none() {
                    // Try to subscribe again on the next round (the region may be back).
                    changes = store.watch_changes().await.ok();
                }
            }
        })
    }
}
