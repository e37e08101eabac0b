//! The authority: the stores it drives, its clock and settings, shared by every part.

use std::collections::BTreeMap;
use std::sync::Arc;

use tokio::sync::{broadcast, Mutex};
use tollgate_core::{AccountId, RegionId};
use tollgate_ledger::LedgerStore;
use tollgate_region::RegionStore;

use crate::clock::Clock;
use crate::events::Event;
use crate::http::HttpClient;
use crate::metrics::AuthorityMetrics;
use crate::settings::{AuthoritySettings, WATCH_CHANNEL_CAPACITY};
use crate::state::StateStore;

/// Accounts whose allocation lock is kept; beyond this the map is cleared of idle locks.
const ACCOUNT_LOCKS_MAX: usize = 100_000;

pub struct Authority<L: LedgerStore + ?Sized, R: RegionStore> {
    pub(crate) ledger: Arc<L>,
    pub(crate) state: StateStore,
    pub(crate) regions: BTreeMap<RegionId, Arc<R>>,
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) settings: AuthoritySettings,
    pub(crate) events: broadcast::Sender<Event>,
    pub(crate) http: HttpClient,
    /// What the loops count and time for `/metrics`, and the gauges read at scrape time.
    pub(crate) metrics: AuthorityMetrics,
    /// One allocation decision per account at a time: decisions read the allocation counters
    /// and the regions' views, then change both.
    account_locks: std::sync::Mutex<BTreeMap<AccountId, Arc<Mutex<()>>>>,
    /// Accounts whose ledger changed since the notifier last looked.
    pub(crate) dirty: std::sync::Mutex<crate::notifier::Dirty>,
    /// Usage whose debt a grant issued since should settle, waiting for a region holding the
    /// grant's credits to have its usage of the account reconciled (see `settle_late_debt`).
    /// Kept in memory: after a restart the debt stands until the account's next grant, as
    /// it would have had the usage arrived first.
    pub(crate) late_debt: std::sync::Mutex<BTreeMap<AccountId, Vec<crate::reconciler::Overdrawn>>>,
    /// Grants being closed (see `closing`): allocation hands none of them out.
    closing: std::sync::Mutex<std::collections::BTreeSet<(AccountId, tollgate_core::GrantId)>>,
    /// One reconciliation of a region at a time: the background loop and a closing grant both
    /// reconcile, and a region's batches apply in stream order.
    reconciling: BTreeMap<RegionId, Arc<Mutex<()>>>,
}

impl<L: LedgerStore + ?Sized, R: RegionStore> Authority<L, R> {
    pub fn new(
        ledger: Arc<L>,
        state: StateStore,
        regions: BTreeMap<RegionId, Arc<R>>,
        clock: Arc<dyn Clock>,
        settings: AuthoritySettings,
    ) -> Self {
        let (events, _) = broadcast::channel(WATCH_CHANNEL_CAPACITY);
        let http = HttpClient::new(settings.http_timeout_ms);
        let metrics = AuthorityMetrics::new();
        for endpoint in &settings.webhooks {
            metrics.add_endpoint(&endpoint.name);
        }
        let reconciling = regions
            .keys()
            .map(|region| (region.clone(), Arc::default()))
            .collect();
        Authority {
            ledger,
            state,
            regions,
            clock,
            settings,
            events,
            http,
            metrics,
            account_locks: std::sync::Mutex::new(BTreeMap::new()),
            dirty: std::sync::Mutex::new(crate::notifier::Dirty::default()),
            late_debt: std::sync::Mutex::new(BTreeMap::new()),
            closing: std::sync::Mutex::new(std::collections::BTreeSet::new()),
            reconciling,
        }
    }

    pub fn ledger(&self) -> &Arc<L> {
        &self.ledger
    }

    pub fn state(&self) -> &StateStore {
        &self.state
    }

    pub fn regions(&self) -> &BTreeMap<RegionId, Arc<R>> {
        &self.regions
    }

    pub fn clock(&self) -> &Arc<dyn Clock> {
        &self.clock
    }

    pub fn settings(&self) -> &AuthoritySettings {
        &self.settings
    }

    pub fn metrics(&self) -> &AuthorityMetrics {
        &self.metrics
    }

    /// Forgets what `region` holds, for a region whose store started again empty (the
    /// embedded node's in-memory region after a restart), so the authority stops counting
    /// credits that are gone and the next cold path allocates from the ledger again, in
    /// burn-down order. See [`StateStore::forget_region_holdings`] for when it is safe.
    pub async fn forget_region_holdings(
        &self,
        region: &RegionId,
    ) -> crate::Result<crate::state::ForgottenHoldings> {
        self.region(region)?;
        let forgotten = self.state.forget_region_holdings(region).await?;
        tracing::info!(
            %region,
            counters = forgotten.counters,
            install_intents = forgotten.install_intents,
            accounts = forgotten.accounts,
            "forgot what the restarted region held"
        );
        Ok(forgotten)
    }

    pub(crate) fn endpoint_names(&self) -> Vec<String> {
        self.settings
            .webhooks
            .iter()
            .map(|w| w.name.clone())
            .collect()
    }

    pub(crate) fn closing_set(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::BTreeSet<(AccountId, tollgate_core::GrantId)>>
    {
        // A panic elsewhere while holding the set cannot leave it inconsistent.
        self.closing.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The lock one region's reconciliation holds.
    pub(crate) fn reconcile_lock(&self, region: &RegionId) -> Option<Arc<Mutex<()>>> {
        self.reconciling.get(region).cloned()
    }

    pub(crate) fn account_lock(&self, account: &AccountId) -> Arc<Mutex<()>> {
        let mut locks = match self.account_locks.lock() {
            Ok(locks) => locks,
            // A panic elsewhere while holding the map cannot leave it inconsistent.
            Err(poisoned) => poisoned.into_inner(),
        };
        if locks.len() >= ACCOUNT_LOCKS_MAX {
            locks.retain(|_, lock| Arc::strong_count(lock) > 1);
        }
        Arc::clone(locks.entry(account.clone()).or_default())
    }
}
