//! The authority's Prometheus metrics, on one registry: what the background work counts and
//! times as it runs (allocations, webhook failures, reconciliation passes), and gauges read
//! from the regions and the state when `/metrics` is scraped (usage streams, watermarks,
//! credits out in regions, the webhook outbox). docs/authority.md says what to alert on.

use std::time::Duration;

use prometheus::{
    Encoder, GaugeVec, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry,
    TextEncoder,
};
use tollgate_core::{RegionId, Timestamp};
use tollgate_ledger::LedgerStore;
use tollgate_region::RegionStore;
use tracing::error;

use crate::authority::Authority;

/// Metric names, kept together so dashboards and docs can rely on them.
pub const USAGE_STREAM_RECORDS: &str = "tollgate_authority_usage_stream_records";
pub const USAGE_STREAM_OLDEST_AGE_SECONDS: &str =
    "tollgate_authority_usage_stream_oldest_age_seconds";
pub const RECONCILIATION_WATERMARK_LAG_SECONDS: &str =
    "tollgate_authority_reconciliation_watermark_lag_seconds";
pub const RECONCILIATION_LAST_SUCCESS_SECONDS: &str =
    "tollgate_authority_reconciliation_last_success_timestamp_seconds";
pub const ALLOCATION_OUTSTANDING_MICROS: &str = "tollgate_authority_allocation_outstanding_micros";
pub const ALLOCATION_DURATION_SECONDS: &str = "tollgate_authority_allocation_duration_seconds";
pub const WEBHOOK_DELIVERY_FAILURES_TOTAL: &str =
    "tollgate_authority_webhook_delivery_failures_total";
pub const WEBHOOK_DELIVERIES_GIVEN_UP_TOTAL: &str =
    "tollgate_authority_webhook_deliveries_given_up_total";
pub const OUTBOX_PENDING_DELIVERIES: &str = "tollgate_authority_outbox_pending_deliveries";
pub const OUTBOX_OLDEST_PENDING_AGE_SECONDS: &str =
    "tollgate_authority_outbox_oldest_pending_age_seconds";

/// Allocation latency buckets, in seconds: 1 ms to 30 s (a pass's time limit).
const ALLOCATION_BUCKETS_S: &[f64] = &[
    0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

pub struct AuthorityMetrics {
    registry: Registry,
    stream_records: IntGaugeVec,
    stream_oldest_age_s: GaugeVec,
    watermark_lag_s: GaugeVec,
    last_reconciled_s: GaugeVec,
    outstanding_micros: IntGaugeVec,
    allocation_s: HistogramVec,
    webhook_failures: IntCounterVec,
    webhooks_given_up: IntCounterVec,
    // Vectors without labels, so a scrape that cannot read them leaves them out (`reset`).
    outbox_pending: IntGaugeVec,
    outbox_oldest_age_s: GaugeVec,
}

impl Default for AuthorityMetrics {
    fn default() -> Self {
        AuthorityMetrics::new()
    }
}

impl AuthorityMetrics {
    pub fn new() -> AuthorityMetrics {
        let per_region = |name: &str, help: &str| Opts::new(name, help);
        // The definitions are constants: a failure here is a bug in this file, caught by
        // every test that builds an authority.
        const DEFINED: &str = "static metric definition";
        let metrics = AuthorityMetrics {
            registry: Registry::new(),
            stream_records: IntGaugeVec::new(
                per_region(
                    USAGE_STREAM_RECORDS,
                    "Usage records in the region's stream not acknowledged by the authority yet (records).",
                ),
                &["region"],
            )
            .expect(DEFINED),
            stream_oldest_age_s: GaugeVec::new(
                per_region(
                    USAGE_STREAM_OLDEST_AGE_SECONDS,
                    "Age of the oldest usage record in the region's stream not reconciled yet, 0 when the stream is empty (seconds).",
                ),
                &["region"],
            )
            .expect(DEFINED),
            watermark_lag_s: GaugeVec::new(
                per_region(
                    RECONCILIATION_WATERMARK_LAG_SECONDS,
                    "How far the region's reconciliation watermark is behind now, the lateness allowance included; expiries wait for it (seconds).",
                ),
                &["region"],
            )
            .expect(DEFINED),
            last_reconciled_s: GaugeVec::new(
                per_region(
                    RECONCILIATION_LAST_SUCCESS_SECONDS,
                    "When a reconciliation run of the region last ended without error (Unix time, seconds).",
                ),
                &["region"],
            )
            .expect(DEFINED),
            outstanding_micros: IntGaugeVec::new(
                per_region(
                    ALLOCATION_OUTSTANDING_MICROS,
                    "Credits of grants allocated to the region and neither taken back nor reconciled as spent (micro-credits).",
                ),
                &["region"],
            )
            .expect(DEFINED),
            allocation_s: HistogramVec::new(
                HistogramOpts::new(
                    ALLOCATION_DURATION_SECONDS,
                    "Time to answer an allocation, cold-path request (reason requested) or refill under the low-water mark (reason refill) (seconds).",
                )
                .buckets(ALLOCATION_BUCKETS_S.to_vec()),
                &["region", "reason", "outcome"],
            )
            .expect(DEFINED),
            webhook_failures: IntCounterVec::new(
                Opts::new(
                    WEBHOOK_DELIVERY_FAILURES_TOTAL,
                    "Webhook delivery attempts the endpoint did not accept: no answer, or not 2xx (attempts).",
                ),
                &["endpoint"],
            )
            .expect(DEFINED),
            webhooks_given_up: IntCounterVec::new(
                Opts::new(
                    WEBHOOK_DELIVERIES_GIVEN_UP_TOTAL,
                    "Webhook deliveries given up after their last attempt failed (deliveries).",
                ),
                &["endpoint"],
            )
            .expect(DEFINED),
            outbox_pending: IntGaugeVec::new(
                Opts::new(
                    OUTBOX_PENDING_DELIVERIES,
                    "Webhook deliveries in the outbox not delivered nor given up yet, retries included (deliveries).",
                ),
                &[],
            )
            .expect(DEFINED),
            outbox_oldest_age_s: GaugeVec::new(
                Opts::new(
                    OUTBOX_OLDEST_PENDING_AGE_SECONDS,
                    "Age of the event of the oldest pending webhook delivery, 0 when none is pending (seconds).",
                ),
                &[],
            )
            .expect(DEFINED),
        };
        let collectors: [Box<dyn prometheus::core::Collector>; 10] = [
            Box::new(metrics.stream_records.clone()),
            Box::new(metrics.stream_oldest_age_s.clone()),
            Box::new(metrics.watermark_lag_s.clone()),
            Box::new(metrics.last_reconciled_s.clone()),
            Box::new(metrics.outstanding_micros.clone()),
            Box::new(metrics.allocation_s.clone()),
            Box::new(metrics.webhook_failures.clone()),
            Box::new(metrics.webhooks_given_up.clone()),
            Box::new(metrics.outbox_pending.clone()),
            Box::new(metrics.outbox_oldest_age_s.clone()),
        ];
        for collector in collectors {
            metrics.registry.register(collector).expect(DEFINED);
        }
        metrics
    }

    /// Shows a configured endpoint's counters at 0 before its first failure, so a rate over
    /// them has a start.
    pub fn add_endpoint(&self, endpoint: &str) {
        self.webhook_failures.with_label_values(&[endpoint]);
        self.webhooks_given_up.with_label_values(&[endpoint]);
    }

    pub fn observe_allocation(&self, region: &RegionId, reason: &str, ok: bool, took: Duration) {
        let outcome = if ok { "ok" } else { "error" };
        self.allocation_s
            .with_label_values(&[region.as_str(), reason, outcome])
            .observe(took.as_secs_f64());
    }

    pub fn webhook_failed(&self, endpoint: &str) {
        self.webhook_failures.with_label_values(&[endpoint]).inc();
    }

    pub fn webhook_given_up(&self, endpoint: &str) {
        self.webhooks_given_up.with_label_values(&[endpoint]).inc();
    }

    /// A reconciliation run of `region` ended without error at `now`.
    pub fn reconciled(&self, region: &RegionId, now: Timestamp) {
        self.last_reconciled_s
            .with_label_values(&[region.as_str()])
            .set(seconds(now.millis()));
    }

    /// The registry in Prometheus' text format.
    pub fn render(&self) -> String {
        let mut buffer = Vec::new();
        if let Err(error) = TextEncoder::new().encode(&self.registry.gather(), &mut buffer) {
            error!(%error, "encoding the authority's metrics failed");
        }
        String::from_utf8(buffer).unwrap_or_default()
    }
}

fn seconds(ms: i64) -> f64 {
    ms as f64 / 1_000.0
}

/// Seconds from `then_ms` to `now_ms`, never negative (clocks of different machines).
fn age_s(now_ms: i64, then_ms: i64) -> f64 {
    seconds(now_ms.saturating_sub(then_ms).max(0))
}

impl<L: LedgerStore + ?Sized, R: RegionStore> Authority<L, R> {
    /// Reads the gauges of every region and of the state, then renders the registry. A source
    /// that does not answer has its gauges left out (and says so in the log), so the rest of
    /// the page is still served and no stale figure passes for a fresh one.
    pub async fn metrics_text(&self) -> String {
        let now = self.clock.now().millis();
        for (region, store) in &self.regions {
            let labels = [region.as_str()];
            let (records, oldest_age) = (
                &self.metrics.stream_records,
                &self.metrics.stream_oldest_age_s,
            );
            match store.usage_backlog().await {
                Ok(Some(backlog)) => {
                    records
                        .with_label_values(&labels)
                        .set(i64::try_from(backlog.records).unwrap_or(i64::MAX));
                    let age = backlog.oldest_appended_ms.map_or(0.0, |ms| age_s(now, ms));
                    oldest_age.with_label_values(&labels).set(age);
                }
                Ok(None) => {}
                Err(error) => {
                    error!(%region, %error, "reading the usage stream for /metrics failed");
                    let _ = records.remove_label_values(&labels);
                    let _ = oldest_age.remove_label_values(&labels);
                }
            }
        }
        self.observe_state(now).await;
        self.metrics.render()
    }

    async fn observe_state(&self, now: i64) {
        let metrics = &self.metrics;
        metrics.watermark_lag_s.reset();
        match self.state.watermarks().await {
            Ok(marks) => {
                for (region, mark) in marks.iter().filter(|(r, _)| self.regions.contains_key(*r)) {
                    metrics
                        .watermark_lag_s
                        .with_label_values(&[region.as_str()])
                        .set(age_s(now, mark.millis()));
                }
            }
            Err(error) => error!(%error, "reading watermarks for /metrics failed"),
        }
        metrics.outstanding_micros.reset();
        match self.state.allocation_outstanding_micros().await {
            Ok(outstanding) => {
                // Every region is shown, at 0 when nothing is out there.
                for region in self.regions.keys() {
                    let micros = outstanding.get(region).copied().unwrap_or(0);
                    metrics
                        .outstanding_micros
                        .with_label_values(&[region.as_str()])
                        .set(micros);
                }
            }
            Err(error) => error!(%error, "reading allocations for /metrics failed"),
        }
        metrics.outbox_pending.reset();
        metrics.outbox_oldest_age_s.reset();
        match self.state.outbox_backlog().await {
            Ok(backlog) => {
                metrics
                    .outbox_pending
                    .with_label_values(&[] as &[&str])
                    .set(backlog.pending);
                let age = backlog
                    .oldest_occurred_at
                    .map_or(0.0, |at| age_s(now, at.millis()));
                metrics
                    .outbox_oldest_age_s
                    .with_label_values(&[] as &[&str])
                    .set(age);
            }
            Err(error) => error!(%error, "reading the outbox for /metrics failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_are_never_negative() {
        assert_eq!(age_s(10_500, 9_000), 1.5);
        assert_eq!(age_s(9_000, 10_500), 0.0, "a clock behind another's");
    }

    #[test]
    fn every_family_says_what_it_means() {
        let metrics = AuthorityMetrics::new();
        let region = RegionId::new("eu").unwrap();
        metrics.add_endpoint("billing");
        metrics.webhook_failed("billing");
        metrics.observe_allocation(&region, "refill", true, Duration::from_millis(3));
        metrics.reconciled(&region, Timestamp::from_millis(1_500).unwrap());
        let text = metrics.render();
        assert!(
            text.contains(
                "tollgate_authority_webhook_delivery_failures_total{endpoint=\"billing\"} 1\n"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "tollgate_authority_webhook_deliveries_given_up_total{endpoint=\"billing\"} 0\n"
            ),
            "{text}"
        );
        assert!(text.contains("tollgate_authority_reconciliation_last_success_timestamp_seconds{region=\"eu\"} 1.5\n"), "{text}");
        for name in [
            WEBHOOK_DELIVERY_FAILURES_TOTAL,
            WEBHOOK_DELIVERIES_GIVEN_UP_TOTAL,
            ALLOCATION_DURATION_SECONDS,
            RECONCILIATION_LAST_SUCCESS_SECONDS,
        ] {
            assert!(text.contains(&format!("# HELP {name} ")), "{name}: {text}");
        }
    }
}
