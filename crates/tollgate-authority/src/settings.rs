//! The authority's limits and tunables. Limits are constants with their unit last; what an
//! operator may tune lives in [`AuthoritySettings`], whose defaults are these constants.

/// Consumer group the authority reads every region's usage stream with (one per stream).
pub const USAGE_GROUP: &str = "authority";
/// Consumer name: fixed, so records read but not acknowledged before a restart are delivered
/// again to the restarted authority first.
pub const USAGE_CONSUMER: &str = "authority-0";
/// Usage records read (and applied in one ledger transaction) per batch.
pub const USAGE_BATCH_RECORDS_MAX: usize = 1_000;
/// How far behind the moment a stream was drained an event time may still arrive: edges accept
/// event times up to 10 minutes old, and cached decisions are flushed within a lease's life.
pub const WATERMARK_LATENESS_MS_DEFAULT: i64 = 15 * 60_000;

/// How long ahead of a burn rate an allocation should last.
pub const ALLOCATION_HORIZON_MS_DEFAULT: i64 = 60_000;
/// Smallest slice handed to a region, in micro-credits (10 credits), so a cold account does not
/// come back for every request.
pub const ALLOCATION_MICROS_MIN_DEFAULT: i64 = 10_000_000;
/// Largest allocation one region holds for one account, in micro-credits (1,000,000 credits).
pub const ALLOCATION_MICROS_MAX_DEFAULT: i64 = 1_000_000_000_000;
/// Refill when the region's pool falls under this share of the target, in percent.
pub const LOW_WATER_PERCENT_DEFAULT: i64 = 25;
/// Spends of the size a region sees (see [`SPEND_DECAY_PERCENT`]) its target covers at least.
/// Four: at the default low-water mark (25 %) the mark is then one such spend, so a region is
/// refilled while it can still pay the next one, and a refill puts it three spends above the
/// mark, which pays the spends made while that refill waits for their usage to be reconciled,
/// and makes it refill once per few spends rather than after each.
pub const TARGET_SPEND_MULTIPLE: i64 = 4;
/// How much the size of recent spends a region remembers per account (the largest one,
/// decaying) loses with each smaller spend, in percent: after a large spend it halves in
/// about seven smaller ones, so one unusual spend does not keep the target high for long.
pub const SPEND_DECAY_PERCENT: i64 = 10;
/// A region that has not used an account's allocation for this long gives it back.
pub const IDLE_MS_DEFAULT: i64 = 15 * 60_000;
/// A region short of credits for a spend may take what another region holds of the account
/// once that region has not used it (nor been given any) for this long.
pub const MOVE_IDLE_MS_DEFAULT: i64 = 5_000;
/// Groups of outside credits (see `AccountSummary::outside`) one summary carries at most.
pub const SUMMARY_OUTSIDE_GROUPS_MAX: usize = 256;
/// Weight of the newest batch in the burn-rate average, in percent.
pub const BURN_RATE_WEIGHT_PERCENT: i64 = 30;
/// Most segments one allocation installs (a slice per grant).
pub const ALLOCATION_SEGMENTS_MAX: usize = 64;
/// Grants an allocation reads first, in burn-down order; it reads the rest of the account's
/// grants holding credits only when these cannot decide the slices.
pub const ALLOCATION_GRANTS_FIRST: usize = 128;

/// How long before a grant expires `grant.expiring` fires.
pub const EXPIRING_NOTICE_MS_DEFAULT: i64 = 3 * 24 * 3_600_000;
/// Grants expired, periods closed, schedules issued per scheduler pass (the rest wait a pass).
pub const SCHEDULER_WORK_PER_PASS_MAX: u32 = 500;
/// Periods one schedule may catch up in one pass (a schedule created far in the past).
pub const SCHEDULE_CATCH_UP_PERIODS_MAX: u64 = 36;
/// Allocations whose holds are swept per pass.
pub const SWEEP_ACCOUNTS_PER_PASS_MAX: u32 = 1_000;

/// Webhook deliveries and top-up attempts tried per pass.
pub const DELIVERIES_PER_PASS_MAX: u32 = 100;
/// Attempts per webhook delivery before it is given up (and kept, marked failed).
pub const WEBHOOK_ATTEMPTS_MAX_DEFAULT: u32 = 8;
/// First retry delay; each later one doubles, up to the cap.
pub const RETRY_BASE_MS_DEFAULT: i64 = 1_000;
pub const RETRY_CAP_MS_DEFAULT: i64 = 3_600_000;
/// How long one webhook or hook call may take.
pub const HTTP_TIMEOUT_MS_DEFAULT: u64 = 10_000;
/// Largest response body read from a hook or webhook receiver, in bytes.
pub const HTTP_RESPONSE_BYTES_MAX: usize = 64 * 1024;
/// Attempts to call a top-up hook before the top-up is reported failed.
pub const TOPUP_TRIES_MAX_DEFAULT: u32 = 5;
/// How long the ledger remembers an admin mutation's idempotency key (30 days): a retry
/// within it replays the first result; one after it is a new request.
pub const IDEMPOTENCY_RETENTION_MS_DEFAULT: i64 = 30 * 24 * 3_600_000;
/// Idempotency records one lifecycle pass deletes at most.
pub const IDEMPOTENCY_PRUNE_PER_PASS_MAX: u32 = 10_000;
/// Events buffered for `WatchEvents` subscribers; a slower subscriber catches up from the outbox.
pub const WATCH_CHANNEL_CAPACITY: usize = 1_024;
/// Events one `WatchEvents` catch-up query returns.
pub const WATCH_CATCH_UP_MAX: u32 = 1_000;
/// Accounts whose events are scanned per notifier pass.
pub const NOTIFY_ACCOUNTS_PER_PASS_MAX: u32 = 1_000;

/// Debits one usage breakdown or burn ranking reads at most.
pub const REPORT_DEBITS_MAX: usize = 1_000_000;
/// Entries one revenue report reads at most.
pub const REPORT_ENTRIES_MAX: usize = 1_000_000;
/// Rows one usage breakdown returns at most.
pub const BREAKDOWN_ROWS_MAX: usize = 100_000;

/// What an operator may tune.
#[derive(Clone, Debug)]
pub struct AuthoritySettings {
    pub watermark_lateness_ms: i64,
    pub allocation_horizon_ms: i64,
    pub allocation_micros_min: i64,
    pub allocation_micros_max: i64,
    pub low_water_percent: i64,
    pub idle_ms: i64,
    pub move_idle_ms: i64,
    pub expiring_notice_ms: i64,
    pub webhook_attempts_max: u32,
    pub retry_base_ms: i64,
    pub retry_cap_ms: i64,
    pub http_timeout_ms: u64,
    pub topup_tries_max: u32,
    pub idempotency_retention_ms: i64,
    /// Where events are delivered, each signed with its own secret.
    pub webhooks: Vec<WebhookEndpoint>,
}

impl Default for AuthoritySettings {
    fn default() -> Self {
        AuthoritySettings {
            watermark_lateness_ms: WATERMARK_LATENESS_MS_DEFAULT,
            allocation_horizon_ms: ALLOCATION_HORIZON_MS_DEFAULT,
            allocation_micros_min: ALLOCATION_MICROS_MIN_DEFAULT,
            allocation_micros_max: ALLOCATION_MICROS_MAX_DEFAULT,
            low_water_percent: LOW_WATER_PERCENT_DEFAULT,
            idle_ms: IDLE_MS_DEFAULT,
            move_idle_ms: MOVE_IDLE_MS_DEFAULT,
            expiring_notice_ms: EXPIRING_NOTICE_MS_DEFAULT,
            webhook_attempts_max: WEBHOOK_ATTEMPTS_MAX_DEFAULT,
            retry_base_ms: RETRY_BASE_MS_DEFAULT,
            retry_cap_ms: RETRY_CAP_MS_DEFAULT,
            http_timeout_ms: HTTP_TIMEOUT_MS_DEFAULT,
            topup_tries_max: TOPUP_TRIES_MAX_DEFAULT,
            idempotency_retention_ms: IDEMPOTENCY_RETENTION_MS_DEFAULT,
            webhooks: Vec::new(),
        }
    }
}

impl AuthoritySettings {
    /// What one of several regions should hold for an account: what its burn rate spends over
    /// `allocation_horizon_ms`, and at least [`TARGET_SPEND_MULTIPLE`] spends of the size it
    /// sees (`spend_micros`), so that an account spending rarely but in large amounts is not
    /// sent to the cold path on every spend; within `[allocation_micros_min,
    /// allocation_micros_max]`.
    pub fn allocation_target_micros(&self, burn_micros_per_s: i64, spend_micros: i64) -> i64 {
        let horizon_s = (self.allocation_horizon_ms / 1_000).max(1);
        burn_micros_per_s
            .saturating_mul(horizon_s)
            .max(spend_micros.saturating_mul(TARGET_SPEND_MULTIPLE))
            .clamp(self.allocation_micros_min, self.allocation_micros_max)
    }

    /// The pool under which a region is refilled towards `target_micros`: `low_water_percent`
    /// of the target (rounded up), and at least one spend of the size the region sees, so that
    /// the next such spend is paid from the region, not through the cold path. Never above the
    /// target: a region holding its target has nothing more to be refilled with.
    pub fn low_water_micros(&self, target_micros: i64, spend_micros: i64) -> i64 {
        let share = target_micros
            .saturating_mul(self.low_water_percent)
            .saturating_add(99)
            / 100;
        share.max(spend_micros).min(target_micros)
    }
}

/// A webhook receiver: an `http://` URL and the secret its signatures are made with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WebhookEndpoint {
    /// Names the endpoint in the delivery records (stable across restarts).
    pub name: String,
    pub url: String,
    pub secret: String,
}

/// The delay before retry number `attempt` (1 for the first retry): base × 2^(attempt−1), capped.
pub fn backoff_ms(settings: &AuthoritySettings, attempt: u32) -> i64 {
    let shift = attempt.saturating_sub(1).min(30);
    settings
        .retry_base_ms
        .saturating_mul(1_i64 << shift)
        .min(settings.retry_cap_ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_then_caps() {
        let settings = AuthoritySettings::default();
        let delays: Vec<i64> = (1..=4).map(|a| backoff_ms(&settings, a)).collect();
        assert_eq!(delays, [1_000, 2_000, 4_000, 8_000]);
        assert_eq!(backoff_ms(&settings, 40), RETRY_CAP_MS_DEFAULT);
    }

    const CREDIT: i64 = 1_000_000;

    fn ten_to_thousand() -> AuthoritySettings {
        AuthoritySettings {
            allocation_micros_min: 10 * CREDIT,
            allocation_micros_max: 1_000 * CREDIT,
            ..AuthoritySettings::default()
        }
    }

    #[test]
    fn the_target_covers_several_spends_of_the_size_seen() {
        let settings = ten_to_thousand();
        // No burn rate, no spend seen: the minimum.
        assert_eq!(settings.allocation_target_micros(0, 0), 10 * CREDIT);
        // 40-credit spends, too rare to show in the burn rate: four of them.
        assert_eq!(
            settings.allocation_target_micros(0, 40 * CREDIT),
            TARGET_SPEND_MULTIPLE * 40 * CREDIT
        );
        // A burn rate of 5 credits/s over the 60 s horizon outweighs the spends.
        assert_eq!(
            settings.allocation_target_micros(5 * CREDIT, 40 * CREDIT),
            300 * CREDIT
        );
        // Within the maximum, however large the spends.
        assert_eq!(
            settings.allocation_target_micros(0, 900 * CREDIT),
            1_000 * CREDIT
        );
    }

    #[test]
    fn the_low_water_mark_is_at_least_one_spend_and_at_most_the_target() {
        let settings = ten_to_thousand();
        // The percentage of the target (25 %), rounded up, while spends are small.
        assert_eq!(settings.low_water_micros(10 * CREDIT, CREDIT), 2_500_000);
        assert_eq!(settings.low_water_micros(10, 0), 3);
        // One spend when spends are larger than that share.
        let target = settings.allocation_target_micros(0, 40 * CREDIT);
        assert_eq!(settings.low_water_micros(target, 40 * CREDIT), 40 * CREDIT);
        assert_eq!(
            settings.low_water_micros(10 * CREDIT, 4 * CREDIT),
            4 * CREDIT
        );
        // Never above the target, which a spend beyond the maximum exceeds.
        assert_eq!(
            settings.low_water_micros(1_000 * CREDIT, 2_000 * CREDIT),
            1_000 * CREDIT
        );
    }
}
