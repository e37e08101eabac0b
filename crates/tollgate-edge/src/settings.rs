//! The edge's tunables, with their defaults and bounds. Each is documented in docs/edge.md.

use tollgate_core::{Credits, RegionId};

/// Longest flush interval of cached-mode usage, in milliseconds (DESIGN: every ≤ 20 ms).
pub const FLUSH_INTERVAL_MS_MAX: u64 = 20;
pub const FLUSH_INTERVAL_MS_DEFAULT: u64 = 10;
/// How often the price book's generation is polled, besides change notices (reload ≤ 1 s).
pub const PRICE_POLL_MS_DEFAULT: u64 = 500;
/// How long an unknown account is remembered as unknown.
pub const UNKNOWN_ACCOUNT_TTL_MS_DEFAULT: i64 = 5_000;
/// How long an account summary is trusted before it is read again (notices refresh it sooner).
pub const ACCOUNT_SUMMARY_TTL_MS_DEFAULT: i64 = 30_000;
/// Most account summaries (known or unknown) cached at once.
pub const ACCOUNTS_CACHED_MAX: usize = 1_000_000;
/// Window within which a caller may reverse its own debit.
pub const REVERSE_WINDOW_MS_DEFAULT: i64 = 5 * 60_000;
/// How far in the past a debit's event time may be.
pub const EVENT_TIME_PAST_MS_MAX: i64 = 10 * 60_000;
/// How far in the future a debit's event time may be (clock skew).
pub const EVENT_TIME_FUTURE_MS_MAX: i64 = 5_000;
/// How long one call to the regional store may take before the request fails with UNAVAILABLE.
pub const STORE_TIMEOUT_MS_DEFAULT: u64 = 250;
/// Credits an edge leases per account in cached mode.
pub const LEASE_CREDITS_DEFAULT: i64 = 100;
/// A lease's life without a settlement; settling renews it.
pub const LEASE_TTL_MS_DEFAULT: i64 = 60_000;
/// A lease with no decision for this long goes back to the region.
pub const LEASE_IDLE_MS_DEFAULT: i64 = 15_000;
/// How long before the lease's expiry in the region (as the region last confirmed it) the edge
/// stops deciding from the lease: a margin for the clocks of the edge and of whoever else sweeps
/// the region (other edges, the authority) disagreeing. At most half of `lease_ttl_ms` is used
/// (see [`EdgeSettings::lease_safety_margin_ms`]).
pub const LEASE_SAFETY_MS_DEFAULT: i64 = 2_000;
/// Cached decisions on this edge waiting to be flushed or charged (unbilled), across all
/// accounts; at the cap further cached decisions are decided strict, so a slow or unreachable
/// region cannot pile up decisions that a crash would lose.
pub const PENDING_ENTRIES_MAX: usize = 200_000;
/// The same cap per account.
pub const PENDING_ENTRIES_ACCOUNT_MAX: usize = 10_000;
/// How long a decision the region cannot pay waits for other edges to give back their leases on
/// the account, when those leases hold enough to pay it.
pub const RECALL_WAIT_MS_DEFAULT: u64 = 50;
/// Keys a lease remembers to answer replays locally (per account, most recent first).
pub const LEASE_RECENT_KEYS_MAX: usize = 4_096;

#[derive(Clone, Debug)]
pub struct EdgeSettings {
    pub region: RegionId,
    /// This node's name in lease ids; by default host name, process id and start time.
    pub node_id: Option<String>,
    /// This edge's lease id, when its caller names it (it must be unique per edge: two edges
    /// sharing one would share one lease record in the region). By default it is built from a
    /// counter of the process, the region and `node_id`; the simulation names its own, so a
    /// seed replays the same ids whatever else runs in the process.
    pub lease_id: Option<tollgate_core::LeaseId>,
    pub flush_interval_ms: u64,
    pub price_poll_ms: u64,
    pub unknown_account_ttl_ms: i64,
    pub account_summary_ttl_ms: i64,
    pub reverse_window_ms: i64,
    pub store_timeout_ms: u64,
    pub lease_credits: Credits,
    pub lease_ttl_ms: i64,
    pub lease_idle_ms: i64,
    /// See [`LEASE_SAFETY_MS_DEFAULT`].
    pub lease_safety_ms: i64,
    /// See [`PENDING_ENTRIES_MAX`].
    pub pending_entries_max: usize,
    /// See [`PENDING_ENTRIES_ACCOUNT_MAX`].
    pub pending_entries_account_max: usize,
    pub recall_wait_ms: u64,
}

impl EdgeSettings {
    pub fn new(region: RegionId) -> Self {
        EdgeSettings {
            region,
            node_id: None,
            lease_id: None,
            flush_interval_ms: FLUSH_INTERVAL_MS_DEFAULT,
            price_poll_ms: PRICE_POLL_MS_DEFAULT,
            unknown_account_ttl_ms: UNKNOWN_ACCOUNT_TTL_MS_DEFAULT,
            account_summary_ttl_ms: ACCOUNT_SUMMARY_TTL_MS_DEFAULT,
            reverse_window_ms: REVERSE_WINDOW_MS_DEFAULT,
            store_timeout_ms: STORE_TIMEOUT_MS_DEFAULT,
            lease_credits: Credits::from_micros(LEASE_CREDITS_DEFAULT * 1_000_000),
            lease_ttl_ms: LEASE_TTL_MS_DEFAULT,
            lease_idle_ms: LEASE_IDLE_MS_DEFAULT,
            lease_safety_ms: LEASE_SAFETY_MS_DEFAULT,
            pending_entries_max: PENDING_ENTRIES_MAX,
            pending_entries_account_max: PENDING_ENTRIES_ACCOUNT_MAX,
            recall_wait_ms: RECALL_WAIT_MS_DEFAULT,
        }
    }

    /// The margin kept before a lease's expiry in the region: `lease_safety_ms`, at least 0 and
    /// at most half of `lease_ttl_ms` (so a fresh lease is usable for at least half its life).
    pub fn lease_safety_margin_ms(&self) -> i64 {
        self.lease_safety_ms
            .clamp(0, (self.lease_ttl_ms / 2).max(0))
    }
}
