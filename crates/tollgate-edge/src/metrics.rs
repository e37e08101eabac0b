//! The edge's Prometheus metrics: decisions by call and outcome, decision latency, lease
//! refills, flush lag and backlog, decisions served and not yet charged, and the price book
//! generation in memory.

use std::sync::atomic::Ordering;
use std::time::Duration;

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, Opts, Registry, TextEncoder,
};

use crate::leases::LeaseStats;

/// Metric names, kept together so dashboards and docs can rely on them.
pub const DECISIONS_TOTAL: &str = "tollgate_edge_decisions_total";
pub const DECISION_SECONDS: &str = "tollgate_edge_decision_seconds";
pub const LEASE_REFILLS_TOTAL: &str = "tollgate_edge_lease_refills_total";
pub const LEASE_FLUSHES_TOTAL: &str = "tollgate_edge_lease_flushes_total";
pub const LEASE_DUPLICATES_TOTAL: &str = "tollgate_edge_lease_duplicates_total";
pub const LEASE_LOST_ENTRIES_TOTAL: &str = "tollgate_edge_lease_lost_entries_total";
pub const LEASE_REKEYED_TOTAL: &str = "tollgate_edge_lease_rekeyed_total";
pub const LEASE_RECALLED_TOTAL: &str = "tollgate_edge_lease_recalled_total";
pub const LEASE_DEADLINE_PASSED_TOTAL: &str = "tollgate_edge_lease_deadline_passed_total";
pub const PENDING_CAP_REACHED_TOTAL: &str = "tollgate_edge_pending_cap_reached_total";
pub const FLUSH_LAG_MS: &str = "tollgate_edge_flush_lag_ms";
pub const PENDING_DECISIONS: &str = "tollgate_edge_pending_decisions";
pub const UNBILLED_DECISIONS: &str = "tollgate_edge_unbilled_decisions";
pub const UNBILLED_MICROS: &str = "tollgate_edge_unbilled_micros";
pub const PRICE_BOOK_GENERATION: &str = "tollgate_edge_price_book_generation";
pub const SUMMARY_REREADS_TOTAL: &str = "tollgate_edge_summary_rereads_total";
pub const SUMMARY_BEHIND_TOTAL: &str = "tollgate_edge_summary_behind_total";

/// Decision latency buckets, in seconds: 25 µs to 1 s.
const LATENCY_BUCKETS_S: &[f64] = &[
    0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1,
    0.25, 1.0,
];

#[derive(Clone, Copy, Debug)]
pub enum Rpc {
    Authorize,
    Capture,
    Release,
    Debit,
    Reverse,
    GetBalance,
    Quote,
    Enforce,
    ShouldRateLimit,
}

impl Rpc {
    pub const fn as_str(self) -> &'static str {
        match self {
            Rpc::Authorize => "authorize",
            Rpc::Capture => "capture",
            Rpc::Release => "release",
            Rpc::Debit => "debit",
            Rpc::Reverse => "reverse",
            Rpc::GetBalance => "get_balance",
            Rpc::Quote => "quote",
            Rpc::Enforce => "enforce",
            Rpc::ShouldRateLimit => "should_rate_limit",
        }
    }
}

pub struct Metrics {
    registry: Registry,
    decisions: IntCounterVec,
    latency: HistogramVec,
    refills: IntGauge,
    flushes: IntGauge,
    duplicates: IntGauge,
    lost: IntGauge,
    rekeyed: IntGauge,
    recalled: IntGauge,
    deadline_passed: IntGauge,
    pending_cap_reached: IntGauge,
    flush_lag_ms: IntGauge,
    pending: IntGauge,
    unbilled: IntGauge,
    unbilled_micros: IntGauge,
    price_generation: IntGauge,
    summary_rereads: IntGauge,
    summary_behind: IntGauge,
}

impl Metrics {
    pub fn new() -> Result<Metrics, prometheus::Error> {
        let registry = Registry::new();
        let decisions = IntCounterVec::new(
            Opts::new(DECISIONS_TOTAL, "decisions by call and outcome"),
            &["rpc", "outcome"],
        )?;
        let latency = HistogramVec::new(
            HistogramOpts::new(DECISION_SECONDS, "time to decide, in seconds")
                .buckets(LATENCY_BUCKETS_S.to_vec()),
            &["rpc"],
        )?;
        // Counters kept by the lease manager are exported as gauges set at scrape time.
        let gauge = |name: &str, help: &str| IntGauge::new(name, help);
        let metrics = Metrics {
            refills: gauge(LEASE_REFILLS_TOTAL, "lease top-ups taken from the region")?,
            flushes: gauge(LEASE_FLUSHES_TOTAL, "settlements of cached decisions")?,
            duplicates: gauge(
                LEASE_DUPLICATES_TOTAL,
                "cached decisions found charged already, credited back",
            )?,
            lost: gauge(
                LEASE_LOST_ENTRIES_TOTAL,
                "cached decisions the region rejected from a settlement (they did not fit the lease)",
            )?,
            rekeyed: gauge(
                LEASE_REKEYED_TOTAL,
                "cached decisions whose key was used for a different request, charged under a derived key",
            )?,
            recalled: gauge(
                LEASE_RECALLED_TOTAL,
                "leases given back because another edge of the region needed their credits",
            )?,
            deadline_passed: gauge(
                LEASE_DEADLINE_PASSED_TOTAL,
                "cached requests decided strict because their lease's deadline (region expiry less the safety margin) had passed",
            )?,
            pending_cap_reached: gauge(
                PENDING_CAP_REACHED_TOTAL,
                "cached requests decided strict because too many decisions waited to be flushed (per account or per edge)",
            )?,
            flush_lag_ms: gauge(
                FLUSH_LAG_MS,
                "age of the oldest decision in the last flush, in ms",
            )?,
            pending: gauge(
                PENDING_DECISIONS,
                "cached decisions waiting to be flushed or charged (unbilled included)",
            )?,
            unbilled: gauge(
                UNBILLED_DECISIONS,
                "cached decisions served whose lease expired before their flush, not charged yet (retried)",
            )?,
            unbilled_micros: gauge(
                UNBILLED_MICROS,
                "what the unbilled decisions cost, in micro-credits",
            )?,
            price_generation: gauge(
                PRICE_BOOK_GENERATION,
                "generation of the price book in memory",
            )?,
            summary_rereads: gauge(
                SUMMARY_REREADS_TOTAL,
                "account summaries read again because the region had moved credits since the one in memory",
            )?,
            summary_behind: gauge(
                SUMMARY_BEHIND_TOTAL,
                "summaries read again and still behind the region (the authority moved credits and had not published yet)",
            )?,
            decisions,
            latency,
            registry,
        };
        metrics
            .registry
            .register(Box::new(metrics.decisions.clone()))?;
        metrics
            .registry
            .register(Box::new(metrics.latency.clone()))?;
        for gauge in [
            &metrics.refills,
            &metrics.flushes,
            &metrics.duplicates,
            &metrics.lost,
            &metrics.rekeyed,
            &metrics.recalled,
            &metrics.deadline_passed,
            &metrics.pending_cap_reached,
            &metrics.flush_lag_ms,
            &metrics.pending,
            &metrics.unbilled,
            &metrics.unbilled_micros,
            &metrics.price_generation,
            &metrics.summary_rereads,
            &metrics.summary_behind,
        ] {
            metrics.registry.register(Box::new(gauge.clone()))?;
        }
        Ok(metrics)
    }

    pub fn decided(&self, rpc: Rpc, outcome: &str, took: Duration) {
        self.decisions
            .with_label_values(&[rpc.as_str(), outcome])
            .inc();
        self.latency
            .with_label_values(&[rpc.as_str()])
            .observe(took.as_secs_f64());
    }

    /// The text exposition, with the lease manager's counters read now.
    pub fn render(&self, leases: &LeaseStats, pending: usize, price_generation: u64) -> String {
        let read = |counter: &std::sync::atomic::AtomicU64| {
            i64::try_from(counter.load(Ordering::Relaxed)).unwrap_or(i64::MAX)
        };
        self.refills.set(read(&leases.refills));
        self.flushes.set(read(&leases.flushes));
        self.duplicates.set(read(&leases.duplicates));
        self.lost.set(read(&leases.lost_entries));
        self.rekeyed.set(read(&leases.rekeyed));
        self.recalled.set(read(&leases.recalled));
        self.deadline_passed.set(read(&leases.deadline_passed));
        self.pending_cap_reached
            .set(read(&leases.pending_cap_reached));
        self.flush_lag_ms.set(read(&leases.flush_lag_ms));
        self.pending.set(i64::try_from(pending).unwrap_or(i64::MAX));
        self.unbilled.set(read(&leases.unbilled_decisions));
        self.unbilled_micros.set(read(&leases.unbilled_micros));
        self.price_generation
            .set(i64::try_from(price_generation).unwrap_or(i64::MAX));
        self.summary_rereads.set(read(&leases.summary_rereads));
        self.summary_behind.set(read(&leases.summary_behind));
        let mut text = Vec::new();
        // Encoding into a Vec cannot fail for the text format.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut text);
        String::from_utf8(text).unwrap_or_default()
    }
}
