//! `GET /metrics` of a node that runs the authority: what `before` renders (the edge's
//! metrics on the embedded node; nothing under `serve`), the parked usage gauges, then the
//! authority's own metrics (`tollgate_authority::metrics`), the gauges read at scrape time.

use std::sync::Arc;

use tollgate_authority::Authority;
use tollgate_ledger::LedgerStore;
use tollgate_region::RegionStore;

/// The Prometheus text format's content type.
const TEXT_FORMAT: &str = "text/plain; version=0.0.4";

pub fn router<R: RegionStore>(
    authority: Arc<Authority<dyn LedgerStore, R>>,
    before: Arc<dyn Fn() -> String + Send + Sync>,
) -> axum::Router {
    axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let (authority, before) = (Arc::clone(&authority), Arc::clone(&before));
            async move {
                let mut text = before();
                text.push_str(&crate::parked::metrics_text(authority.state()).await);
                text.push_str(&authority.metrics_text().await);
                ([(axum::http::header::CONTENT_TYPE, TEXT_FORMAT)], text)
            }
        }),
    )
}
