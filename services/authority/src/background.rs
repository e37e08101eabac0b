//! The authority's background work, as independent tasks: the reconciliation of each region,
//! the lifecycle pass, notifications, top-ups, webhook deliveries, and reacting to admin
//! changes. Each runs on its own schedule and each pass has its own time limit, so a region
//! that does not answer, or a webhook receiver that is slow, holds nothing else back.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tollgate_authority::{Authority, AuthorityError};
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
/// How long one pass of a task may take before it is given up (and retried on schedule).
pub const PASS_TIMEOUT_MS: u64 = 30_000;

type Node<R> = Authority<dyn LedgerStore, R>;
/// One pass of a concern run on the lifecycle's schedule.
type Pass<R> = fn(Arc<Node<R>>) -> Pin<Box<dyn Future<Output = Result<(), AuthorityError>> + Send>>;

/// Runs until `stopped` turns true.
pub async fn run<R: RegionStore>(
    authority: Arc<Node<R>>,
    mut changes: mpsc::Receiver<AccountId>,
    stopped: watch::Receiver<bool>,
) {
    if let Err(error) = authority.publish_price_books().await {
        warn!(%error, "publishing price books at start failed");
    }
    if let Err(error) = authority.scan_every_account().await {
        warn!(%error, "first notifier scan failed");
    }
    let mut tasks = tokio::task::JoinSet::new();
    for region in authority.regions().keys() {
        let (node, region) = (Arc::clone(&authority), region.clone());
        let name = format!("reconciliation of region {region}");
        tasks.spawn(every(
            RECONCILE_INTERVAL_MS,
            name,
            stopped.clone(),
            move || {
                let (node, region) = (Arc::clone(&node), region.clone());
                async move {
                    node.reconcile_region(&region, RECONCILE_PASSES_MAX)
                        .await
                        .map(|_| ())
                }
            },
        ));
    }
    let node = Arc::clone(&authority);
    tasks.spawn(every(
        LIFECYCLE_INTERVAL_MS,
        "lifecycle pass".to_owned(),
        stopped.clone(),
        move || {
            let node = Arc::clone(&node);
            async move {
                // First: installs a crash or a regional fault left unconfirmed (exact counters).
                if let Err(error) = node.recover_installs().await {
                    warn!(%error, "install recovery failed");
                }
                node.tick().await.map(|_| ())
            }
        },
    ));
    let passes: [(&str, Pass<R>); 3] = [
        ("notifier pass", |node| {
            Box::pin(async move { node.notify_pass().await.map(|_| ()) })
        }),
        ("top-up pass", |node| {
            Box::pin(async move { node.run_top_ups().await.map(|_| ()) })
        }),
        ("webhook pass", |node| {
            Box::pin(async move { node.deliver_due().await.map(|_| ()) })
        }),
    ];
    for (name, pass) in passes {
        let node = Arc::clone(&authority);
        tasks.spawn(every(
            LIFECYCLE_INTERVAL_MS,
            name.to_owned(),
            stopped.clone(),
            move || pass(Arc::clone(&node)),
        ));
    }
    let node = Arc::clone(&authority);
    let mut stop = stopped.clone();
    tasks.spawn(async move {
        loop {
            tokio::select! {
                _ = stop.changed() => return,
                received = changes.recv() => {
                    let Some(account) = received else { return };
                    node.mark_dirty(&account);
                    let rebalanced = tokio::time::timeout(
                        Duration::from_millis(PASS_TIMEOUT_MS),
                        node.rebalance(&account),
                    )
                    .await;
                    match rebalanced {
                        Ok(Ok(())) => {}
                        Ok(Err(error)) => {
                            warn!(%account, %error, "reallocation after an admin change failed")
                        }
                        Err(_) => warn!(%account, "reallocation after an admin change timed out"),
                    }
                }
            }
        }
    });
    while tasks.join_next().await.is_some() {}
}

/// Runs `pass` every `interval_ms` until `stopped` turns true; a pass that fails is logged,
/// one that takes longer than [`PASS_TIMEOUT_MS`] is given up, and both are tried again on
/// schedule.
async fn every<F, Fut>(interval_ms: u64, name: String, mut stopped: watch::Receiver<bool>, pass: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = Result<(), AuthorityError>>,
{
    let mut interval = tokio::time::interval(Duration::from_millis(interval_ms));
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stopped.changed() => return,
            _ = interval.tick() => {
                match tokio::time::timeout(Duration::from_millis(PASS_TIMEOUT_MS), pass()).await {
                    Ok(Ok(())) => {}
                    Ok(Err(error)) => warn!(task = %name, %error, "background pass failed"),
                    Err(_) => warn!(task = %name, timeout_ms = PASS_TIMEOUT_MS, "background pass timed out"),
                }
            }
        }
    }
}
