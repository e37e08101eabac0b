//! The authority's background loops: reconciliation of every region, the lifecycle pass,
//! notifications, top-ups and webhook deliveries, and reacting to admin changes.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tollgate_authority::Authority;
use tollgate_core::AccountId;
use tollgate_ledger::LedgerStore;
use tollgate_region::RegionStore;
use tracing::warn;

/// How often every region's usage stream is read.
pub const RECONCILE_INTERVAL_MS: u64 = 200;
/// How often the lifecycle, notifier, top-ups and deliveries run.
pub const LIFECYCLE_INTERVAL_MS: u64 = 1_000;
/// Reads per region per reconciliation round (each up to a full batch).
pub const RECONCILE_PASSES_MAX: usize = 20;

/// Runs until `stopped` turns true.
pub async fn run<R: RegionStore>(
    authority: Arc<Authority<dyn LedgerStore, R>>,
    mut changes: mpsc::Receiver<AccountId>,
    mut stopped: watch::Receiver<bool>,
) {
    if let Err(error) = authority.publish_price_books().await {
        warn!(%error, "publishing price books at start failed");
    }
    if let Err(error) = authority.scan_every_account().await {
        warn!(%error, "first notifier scan failed");
    }
    let mut reconcile = tokio::time::interval(Duration::from_millis(RECONCILE_INTERVAL_MS));
    let mut lifecycle = tokio::time::interval(Duration::from_millis(LIFECYCLE_INTERVAL_MS));
    loop {
        tokio::select! {
            _ = stopped.changed() => return,
            _ = reconcile.tick() => {
                if let Err(error) = authority.reconcile_all(RECONCILE_PASSES_MAX).await {
                    warn!(%error, "reconciliation round failed");
                }
            }
            _ = lifecycle.tick() => lifecycle_pass(&authority).await,
            Some(account) = changes.recv() => {
                authority.mark_dirty(&account);
                if let Err(error) = authority.rebalance(&account).await {
                    warn!(%account, %error, "reallocation after an admin change failed");
                }
            }
        }
    }
}

async fn lifecycle_pass<R: RegionStore>(authority: &Authority<dyn LedgerStore, R>) {
    // First: installs a crash or a regional fault left unconfirmed (exact counters).
    if let Err(error) = authority.recover_installs().await {
        warn!(%error, "install recovery failed");
    }
    if let Err(error) = authority.tick().await {
        warn!(%error, "lifecycle pass failed");
    }
    if let Err(error) = authority.notify_pass().await {
        warn!(%error, "notifier pass failed");
    }
    if let Err(error) = authority.run_top_ups().await {
        warn!(%error, "top-up pass failed");
    }
    if let Err(error) = authority.deliver_due().await {
        warn!(%error, "webhook pass failed");
    }
}
