//! The authority's own durable state, next to the ledger: reconciliation watermarks and
//! markers, what each region was allocated, features and price book versions, schedules,
//! account settings, the notification outbox and its deliveries, and top-up attempts.
//!
//! One implementation over sqlx's `Any` driver serves PostgreSQL and SQLite: every column is an
//! integer (micro-credits, milliseconds) or text (JSON for structured values), so the same
//! queries run on both. Nothing here is money of record; the ledger is.

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};
use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{AnyPool, Row as _};
use tollgate_core::{
    AccountId, Credits, GrantId, IdempotencyKey, PriceBookVersion, RegionId, Timestamp,
};

use crate::error::{AuthorityError, Result};
use crate::events::{Event, EventKind};

mod audit;
mod metrics;
mod parked;
pub use audit::{AuditEntry, AuditRow, AUDIT_PAGE_MAX};
pub use metrics::OutboxBacklog;
pub use parked::{
    NewParked, ParkedFilter, ParkedResolution, ParkedRow, ParkedState, PARKED_PAGE_MAX,
};

/// Connections the state pool opens at most.
pub const STATE_POOL_CONNECTIONS_MAX: u32 = 8;
/// How long a call waits for a connection before it fails.
pub const STATE_ACQUIRE_TIMEOUT_MS: u64 = 5_000;
/// Price book versions kept (each publication sends them all to every region).
pub const PRICE_VERSIONS_MAX: i64 = 10_000;
/// Schedules one account may have.
pub const SCHEDULES_PER_ACCOUNT_MAX: i64 = 1_000;

const SCHEMA: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS authority_watermarks (region TEXT PRIMARY KEY, \
     watermark_ms BIGINT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS authority_applied_usage (region TEXT NOT NULL, \
     usage_id TEXT NOT NULL, PRIMARY KEY (region, usage_id))",
    "CREATE TABLE IF NOT EXISTS authority_parked_usage (region TEXT NOT NULL, \
     usage_id TEXT NOT NULL, account_id TEXT NOT NULL, reason TEXT NOT NULL, \
     record TEXT NOT NULL, parked_ms BIGINT NOT NULL, PRIMARY KEY (region, usage_id))",
    "CREATE TABLE IF NOT EXISTS authority_allocations (region TEXT NOT NULL, \
     account_id TEXT NOT NULL, grant_id TEXT NOT NULL, installed BIGINT NOT NULL, \
     taken_back BIGINT NOT NULL, spent BIGINT NOT NULL, \
     PRIMARY KEY (region, account_id, grant_id))",
    "CREATE TABLE IF NOT EXISTS authority_install_intents (idempotency_key TEXT PRIMARY KEY, \
     region TEXT NOT NULL, account_id TEXT NOT NULL, grant_id TEXT NOT NULL, \
     amount BIGINT NOT NULL, body TEXT NOT NULL, created_ms BIGINT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS authority_usage_seq (region TEXT NOT NULL, \
     account_id TEXT NOT NULL, seq BIGINT NOT NULL, PRIMARY KEY (region, account_id))",
    "CREATE TABLE IF NOT EXISTS authority_region_accounts (region TEXT NOT NULL, \
     account_id TEXT NOT NULL, pool BIGINT NOT NULL, burn_micros_per_s BIGINT NOT NULL, \
     last_usage_ms BIGINT NOT NULL, last_allocation_ms BIGINT NOT NULL, \
     generation BIGINT NOT NULL, PRIMARY KEY (region, account_id))",
    // The size of recent spends per region and account (`RegionAccount::spend_micros`), beside
    // `authority_region_accounts` rather than in it: the schema only creates missing tables,
    // so a column added there would be missing from databases created before it.
    "CREATE TABLE IF NOT EXISTS authority_region_spend (region TEXT NOT NULL, \
     account_id TEXT NOT NULL, spend_micros BIGINT NOT NULL, PRIMARY KEY (region, account_id))",
    "CREATE TABLE IF NOT EXISTS authority_plans (plan_id TEXT PRIMARY KEY, body TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS authority_contracts (account_id TEXT PRIMARY KEY, \
     body TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS authority_features (feature TEXT PRIMARY KEY, \
     body TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS authority_price_versions (version BIGINT PRIMARY KEY, \
     body TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS authority_schedules (account_id TEXT NOT NULL, \
     schedule_id TEXT NOT NULL, body TEXT NOT NULL, cancelled_ms BIGINT, \
     next_issue BIGINT NOT NULL, next_issue_ms BIGINT NOT NULL, next_close BIGINT NOT NULL, \
     next_close_ms BIGINT NOT NULL, PRIMARY KEY (account_id, schedule_id))",
    "CREATE TABLE IF NOT EXISTS authority_account_settings (account_id TEXT PRIMARY KEY, \
     body TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS authority_notify_state (account_id TEXT PRIMARY KEY, \
     cursor_seq BIGINT NOT NULL, flags TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS authority_deliveries (event_id TEXT NOT NULL, \
     endpoint TEXT NOT NULL, attempts BIGINT NOT NULL, next_attempt_ms BIGINT NOT NULL, \
     state TEXT NOT NULL, last_error TEXT NOT NULL, PRIMARY KEY (event_id, endpoint))",
    "CREATE INDEX IF NOT EXISTS authority_deliveries_due ON authority_deliveries \
     (state, next_attempt_ms)",
    "CREATE TABLE IF NOT EXISTS authority_topups (attempt_id TEXT PRIMARY KEY, \
     account_id TEXT NOT NULL, month TEXT NOT NULL, amount BIGINT NOT NULL, \
     state TEXT NOT NULL, tries BIGINT NOT NULL, next_try_ms BIGINT NOT NULL, \
     last_error TEXT NOT NULL, created_ms BIGINT NOT NULL)",
];

/// The outbox: a growing sequence number gives `WatchEvents` its resume order.
const OUTBOX_POSTGRES: &str = "CREATE TABLE IF NOT EXISTS authority_outbox (\
     seq BIGSERIAL PRIMARY KEY, event_id TEXT NOT NULL UNIQUE, account_id TEXT NOT NULL, \
     kind TEXT NOT NULL, body TEXT NOT NULL)";
/// A region account row with the size of its recent spends (none before its first spend).
const SELECT_REGION_ACCOUNT: &str = "SELECT a.region, a.account_id, a.pool, \
     a.burn_micros_per_s, a.last_usage_ms, a.last_allocation_ms, a.generation, \
     s.spend_micros FROM authority_region_accounts a LEFT JOIN authority_region_spend s \
     ON s.region = a.region AND s.account_id = a.account_id";

const OUTBOX_SQLITE: &str = "CREATE TABLE IF NOT EXISTS authority_outbox (\
     seq INTEGER PRIMARY KEY AUTOINCREMENT, event_id TEXT NOT NULL UNIQUE, \
     account_id TEXT NOT NULL, kind TEXT NOT NULL, body TEXT NOT NULL)";

#[derive(Clone, Debug)]
pub struct StateStore {
    pool: AnyPool,
}

/// What one grant's slices in one region add up to, in micro-credits. The grant id is empty
/// for the overdraft room handed to the region.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AllocationRow {
    pub region: RegionId,
    pub grant_id: String,
    pub installed: i64,
    pub taken_back: i64,
    pub spent: i64,
}

impl AllocationRow {
    /// Handed to the region and neither given back nor reconciled as spent: what the region
    /// may still hold, or has spent without the ledger knowing yet.
    pub fn outstanding(&self) -> i64 {
        self.installed - self.taken_back - self.spent
    }
}

/// What [`StateStore::forget_region_holdings`] cleared: rows of each kind.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ForgottenHoldings {
    /// Allocation counters (grants and overdraft room) that had something outstanding.
    pub counters: u64,
    pub install_intents: u64,
    pub accounts: u64,
    pub usage_seqs: u64,
    pub usage_markers: u64,
}

/// One account in one region, as the reconciler last saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegionAccount {
    pub region: RegionId,
    pub account: AccountId,
    pub pool: i64,
    pub burn_micros_per_s: i64,
    pub last_usage_ms: i64,
    pub last_allocation_ms: i64,
    pub generation: i64,
    /// The size of the account's recent single spends in the region, in micro-credits: the
    /// largest, decaying with each smaller spend (see [`decayed_spend_micros`]); 0 before any.
    pub spend_micros: i64,
}

/// The remembered size of recent spends after one more spend of `spent_micros`: that spend
/// when it is at least the remembered size less [`SPEND_DECAY_PERCENT`] %, else the remembered
/// size less that share. A large spend counts at once (the next one may be as large), and
/// fades over a few smaller ones.
///
/// [`SPEND_DECAY_PERCENT`]: crate::settings::SPEND_DECAY_PERCENT
pub fn decayed_spend_micros(remembered_micros: i64, spent_micros: i64) -> i64 {
    let keep = 100 - crate::settings::SPEND_DECAY_PERCENT;
    spent_micros.max(remembered_micros.saturating_mul(keep) / 100)
}

/// What one usage record did to the allocation counters.
#[derive(Clone, Debug)]
pub struct UsageEffect {
    pub usage_id: String,
    pub account: AccountId,
    /// Per grant ("" for overdraft): spent (positive) or given back by a reversal (negative).
    pub spent: Vec<(String, i64)>,
    pub pool: i64,
    pub at: Timestamp,
}

/// A recurring grant and how far the authority has taken it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScheduleRecord {
    pub account: AccountId,
    pub schedule: tollgate_core::GrantSchedule,
    /// No period starts at or after this instant.
    pub ends_at: Option<Timestamp>,
    pub cancelled_at: Option<Timestamp>,
    /// The next period to issue, and when it starts.
    pub next_issue: u64,
    pub next_issue_at: Timestamp,
    /// The oldest period not closed yet, and when it ends.
    pub next_close: u64,
    pub next_close_at: Timestamp,
}

/// Credits counted as handed to a region whose install has not been confirmed yet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InstallIntent {
    pub key: IdempotencyKey,
    pub region: RegionId,
    pub account: AccountId,
    pub spec: tollgate_region::SegmentSpec,
    pub created_at: Timestamp,
}

/// An account's notification and top-up settings.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccountSettings {
    /// `balance.low` fires when the balance falls under this.
    pub low_balance: Option<Credits>,
    pub top_up: Option<TopUpSettings>,
    pub plan: Option<tollgate_core::PlanId>,
    #[serde(default)]
    pub mode: tollgate_region::EnforcementMode,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopUpSettings {
    /// `http://` URL the authority POSTs a top-up request to.
    pub hook_url: String,
    /// Secret the request is signed with.
    pub secret: String,
    /// Top up when the balance falls under this.
    pub threshold: Credits,
    pub amount: Credits,
    /// Most credits topped up per calendar month (UTC).
    pub monthly_cap: Credits,
}

/// Per-account state of the notifier: the last ledger entry it has looked at, and which
/// thresholds are currently crossed (each fires once per crossing).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NotifyFlags {
    pub low: bool,
    pub exhausted: bool,
    pub negative: bool,
    pub top_up_below: bool,
    /// Crossings so far; the next crossing's event id carries the next number.
    pub crossings: u64,
    /// Top-up attempts so far; the next attempt's id carries the next number.
    #[serde(default)]
    pub top_ups: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Delivery {
    pub event_id: String,
    pub endpoint: String,
    pub attempts: u32,
    pub body: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TopUpAttempt {
    pub attempt_id: String,
    pub account: AccountId,
    pub month: String,
    pub amount: Credits,
    pub state: String,
    pub tries: u32,
    pub last_error: String,
}

fn text(row: &AnyRow, column: &str) -> Result<String> {
    Ok(row.try_get::<String, _>(column)?)
}

fn opt_text(row: &AnyRow, column: &str) -> Result<Option<String>> {
    Ok(row.try_get::<Option<String>, _>(column)?)
}

fn int(row: &AnyRow, column: &str) -> Result<i64> {
    Ok(row.try_get::<i64, _>(column)?)
}

fn id<T: TryFrom<String>>(row: &AnyRow, column: &str) -> Result<T>
where
    T::Error: std::fmt::Display,
{
    T::try_from(text(row, column)?).map_err(|e| AuthorityError::corrupt(format!("{column}: {e}")))
}

fn time(ms: i64) -> Result<Timestamp> {
    Timestamp::from_millis(ms).map_err(AuthorityError::corrupt)
}

fn json<T: Serialize>(value: &T) -> Result<String> {
    serde_json::to_string(value).map_err(AuthorityError::corrupt)
}

fn from_json<T: serde::de::DeserializeOwned>(text: &str) -> Result<T> {
    serde_json::from_str(text).map_err(AuthorityError::corrupt)
}

fn count(value: u32) -> i64 {
    i64::from(value)
}

impl StateStore {
    /// Connects to `postgres://…` or `sqlite://path` and creates the tables when missing.
    pub async fn connect(url: &str) -> Result<Self> {
        sqlx::any::install_default_drivers();
        let sqlite = url.starts_with("sqlite:");
        let url = if sqlite && !url.contains("mode=") {
            format!("{url}?mode=rwc")
        } else {
            url.to_owned()
        };
        let pool = AnyPoolOptions::new()
            .max_connections(STATE_POOL_CONNECTIONS_MAX)
            // Fail fast while the database is away: the loops retry on their next tick.
            .acquire_timeout(std::time::Duration::from_millis(STATE_ACQUIRE_TIMEOUT_MS))
            .connect(&url)
            .await?;
        if sqlite {
            sqlx::query("PRAGMA journal_mode=WAL")
                .execute(&pool)
                .await?;
        }
        for statement in SCHEMA {
            sqlx::query(statement).execute(&pool).await?;
        }
        let outbox = if sqlite {
            OUTBOX_SQLITE
        } else {
            OUTBOX_POSTGRES
        };
        sqlx::query(outbox).execute(&pool).await?;
        audit::create_tables(&pool, sqlite).await?;
        parked::create_tables(&pool, sqlite).await?;
        Ok(StateStore { pool })
    }

    // ---- Reconciliation -------------------------------------------------------------------

    pub async fn watermarks(&self) -> Result<BTreeMap<RegionId, Timestamp>> {
        let rows = sqlx::query("SELECT region, watermark_ms FROM authority_watermarks")
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|row| Ok((id(row, "region")?, time(int(row, "watermark_ms")?)?)))
            .collect()
    }

    /// Moves a region's watermark forward (never back).
    pub async fn advance_watermark(&self, region: &RegionId, to: Timestamp) -> Result<()> {
        sqlx::query(
            "INSERT INTO authority_watermarks (region, watermark_ms) VALUES ($1, $2) \
             ON CONFLICT (region) DO UPDATE SET watermark_ms = CASE \
             WHEN excluded.watermark_ms > authority_watermarks.watermark_ms \
             THEN excluded.watermark_ms ELSE authority_watermarks.watermark_ms END",
        )
        .bind(region.as_str())
        .bind(to.millis())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Applies what reconciled usage did to the allocation counters, once per record: a marker
    /// per record, written in the same transaction as the counters, makes a replay a no-op.
    pub async fn record_usage_effects(
        &self,
        region: &RegionId,
        effects: &[UsageEffect],
        now: Timestamp,
    ) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        for effect in effects {
            let inserted = sqlx::query(
                "INSERT INTO authority_applied_usage (region, usage_id) VALUES ($1, $2) \
                 ON CONFLICT (region, usage_id) DO NOTHING",
            )
            .bind(region.as_str())
            .bind(effect.usage_id.as_str())
            .execute(&mut *tx)
            .await?;
            if inserted.rows_affected() == 0 {
                continue;
            }
            for (grant, spent) in &effect.spent {
                sqlx::query(
                    "INSERT INTO authority_allocations (region, account_id, grant_id, installed, \
                     taken_back, spent) VALUES ($1, $2, $3, 0, 0, $4) \
                     ON CONFLICT (region, account_id, grant_id) \
                     DO UPDATE SET spent = authority_allocations.spent + excluded.spent",
                )
                .bind(region.as_str())
                .bind(effect.account.as_str())
                .bind(grant.as_str())
                .bind(*spent)
                .execute(&mut *tx)
                .await?;
            }
            Self::note_usage(&mut tx, region, effect, now).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Keeps the pool level the region reported, an average burn rate (micro-credits per
    /// second, weighted toward the newest usage) and the size of recent spends. One record is
    /// one spend, its cost the sum of what it spent; a record that spent nothing (a reversal
    /// gives back) leaves the size as it was.
    async fn note_usage(
        tx: &mut sqlx::Transaction<'static, sqlx::Any>,
        region: &RegionId,
        effect: &UsageEffect,
        now: Timestamp,
    ) -> Result<()> {
        let spent: i64 = effect.spent.iter().map(|(_, s)| *s).sum::<i64>().max(0);
        let row = sqlx::query(
            "SELECT burn_micros_per_s, last_usage_ms FROM authority_region_accounts \
             WHERE region = $1 AND account_id = $2",
        )
        .bind(region.as_str())
        .bind(effect.account.as_str())
        .fetch_optional(&mut **tx)
        .await?;
        let (rate, last) = match row {
            Some(row) => (int(&row, "burn_micros_per_s")?, int(&row, "last_usage_ms")?),
            None => (0, now.millis()),
        };
        let elapsed_s = ((now.millis() - last) / 1_000).max(1);
        let sample = spent / elapsed_s;
        let weight = crate::settings::BURN_RATE_WEIGHT_PERCENT;
        let rate = (rate * (100 - weight) + sample * weight) / 100;
        sqlx::query(
            "INSERT INTO authority_region_accounts (region, account_id, pool, burn_micros_per_s, \
             last_usage_ms, last_allocation_ms, generation) VALUES ($1, $2, $3, $4, $5, 0, 0) \
             ON CONFLICT (region, account_id) DO UPDATE SET pool = excluded.pool, \
             burn_micros_per_s = excluded.burn_micros_per_s, last_usage_ms = excluded.last_usage_ms",
        )
        .bind(region.as_str())
        .bind(effect.account.as_str())
        .bind(effect.pool)
        .bind(rate)
        .bind(now.millis().max(effect.at.millis()))
        .execute(&mut **tx)
        .await?;
        if spent > 0 {
            Self::note_spend(tx, region, &effect.account, spent).await?;
        }
        Ok(())
    }

    /// Folds one spend into the size of recent spends (see [`decayed_spend_micros`]).
    async fn note_spend(
        tx: &mut sqlx::Transaction<'static, sqlx::Any>,
        region: &RegionId,
        account: &AccountId,
        spent: i64,
    ) -> Result<()> {
        let row = sqlx::query(
            "SELECT spend_micros FROM authority_region_spend WHERE region = $1 AND account_id = $2",
        )
        .bind(region.as_str())
        .bind(account.as_str())
        .fetch_optional(&mut **tx)
        .await?;
        let remembered = match row {
            Some(row) => int(&row, "spend_micros")?,
            None => 0,
        };
        sqlx::query(
            "INSERT INTO authority_region_spend (region, account_id, spend_micros) \
             VALUES ($1, $2, $3) ON CONFLICT (region, account_id) \
             DO UPDATE SET spend_micros = excluded.spend_micros",
        )
        .bind(region.as_str())
        .bind(account.as_str())
        .bind(decayed_spend_micros(remembered, spent))
        .execute(&mut **tx)
        .await?;
        Ok(())
    }

    /// Markers are only needed until their records are acknowledged (no redelivery after that).
    pub async fn forget_usage(&self, region: &RegionId, usage_ids: &[String]) -> Result<()> {
        for usage_id in usage_ids {
            sqlx::query("DELETE FROM authority_applied_usage WHERE region = $1 AND usage_id = $2")
                .bind(region.as_str())
                .bind(usage_id.as_str())
                .execute(&self.pool)
                .await?;
        }
        Ok(())
    }

    /// Keeps a record the ledger refused, for an operator; acknowledging it is then safe.
    /// `record` is the reconciler's description of it, from which the parts are read back
    /// into `authority_parked` (see `state/parked.rs`; [`StateStore::park_usage_record`]
    /// keeps every part, the price tag, actor and hold too).
    pub async fn park_usage(
        &self,
        region: &RegionId,
        usage_id: &str,
        account: &AccountId,
        reason: &str,
        record: &str,
        now: Timestamp,
    ) -> Result<()> {
        self.park_usage_legacy(region, usage_id, account, reason, record, now)
            .await?;
        self.park_described(region, usage_id, account, reason, record, now)
            .await
    }

    async fn park_usage_legacy(
        &self,
        region: &RegionId,
        usage_id: &str,
        account: &AccountId,
        reason: &str,
        record: &str,
        now: Timestamp,
    ) -> Result<()> {
        sqlx::query(
            "INSERT INTO authority_parked_usage (region, usage_id, account_id, reason, record, \
             parked_ms) VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (region, usage_id) DO NOTHING",
        )
        .bind(region.as_str())
        .bind(usage_id)
        .bind(account.as_str())
        .bind(reason)
        .bind(record)
        .bind(now.millis())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn parked_count(&self) -> Result<i64> {
        let row = sqlx::query("SELECT COUNT(*) AS n FROM authority_parked_usage")
            .fetch_one(&self.pool)
            .await?;
        int(&row, "n")
    }

    // ---- Allocation -----------------------------------------------------------------------

    /// The account's allocation counters with something outstanding (see
    /// [`AllocationRow::outstanding`]); the rest of a long history adds nothing to them.
    pub async fn allocations(&self, account: &AccountId) -> Result<Vec<AllocationRow>> {
        let rows = sqlx::query(
            "SELECT region, grant_id, installed, taken_back, spent FROM authority_allocations \
             WHERE account_id = $1 AND installed - taken_back - spent > 0 \
             ORDER BY region, grant_id",
        )
        .bind(account.as_str())
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                Ok(AllocationRow {
                    region: id(row, "region")?,
                    grant_id: text(row, "grant_id")?,
                    installed: int(row, "installed")?,
                    taken_back: int(row, "taken_back")?,
                    spent: int(row, "spent")?,
                })
            })
            .collect()
    }

    /// Counts credits as handed to a region before the region's store is called, so a crash
    /// in between leaves the authority believing it handed out more, never less.
    pub async fn add_installed(
        &self,
        region: &RegionId,
        account: &AccountId,
        grant: &str,
        amount: i64,
    ) -> Result<()> {
        self.add_allocation_column(region, account, grant, "installed", amount)
            .await
    }

    /// Counts credits as handed to a region and records the intent to install them, in one
    /// transaction, before the region's store is called. The intent is cleared once the
    /// region answers; one left behind by a crash is replayed (the install is idempotent by
    /// its key) or cancelled, so the counters end up exact instead of merely on the safe side.
    pub async fn begin_install(&self, intent: &InstallIntent) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "INSERT INTO authority_allocations (region, account_id, grant_id, installed, \
             taken_back, spent) VALUES ($1, $2, $3, $4, 0, 0) \
             ON CONFLICT (region, account_id, grant_id) \
             DO UPDATE SET installed = authority_allocations.installed + excluded.installed",
        )
        .bind(intent.region.as_str())
        .bind(intent.account.as_str())
        .bind(intent.spec.grant_id.as_str())
        .bind(intent.spec.amount.micros())
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "INSERT INTO authority_install_intents (idempotency_key, region, account_id, \
             grant_id, amount, body, created_ms) VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(intent.key.as_str())
        .bind(intent.region.as_str())
        .bind(intent.account.as_str())
        .bind(intent.spec.grant_id.as_str())
        .bind(intent.spec.amount.micros())
        .bind(json(&intent.spec)?)
        .bind(intent.created_at.millis())
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// The region installed the credits: the intent is done.
    pub async fn finish_install(&self, key: &str) -> Result<()> {
        sqlx::query("DELETE FROM authority_install_intents WHERE idempotency_key = $1")
            .bind(key)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// The region refused the install for good (or it can no longer be known to have
    /// happened and the caller chose to keep the counter): uncount it when `uncount`.
    pub async fn cancel_install(&self, intent: &InstallIntent, uncount: bool) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        let gone = sqlx::query("DELETE FROM authority_install_intents WHERE idempotency_key = $1")
            .bind(intent.key.as_str())
            .execute(&mut *tx)
            .await?;
        if uncount && gone.rows_affected() == 1 {
            sqlx::query(
                "UPDATE authority_allocations SET installed = installed - $4 \
                 WHERE region = $1 AND account_id = $2 AND grant_id = $3",
            )
            .bind(intent.region.as_str())
            .bind(intent.account.as_str())
            .bind(intent.spec.grant_id.as_str())
            .bind(intent.spec.amount.micros())
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Whether the intent is still open (not finished nor cancelled).
    pub async fn install_open(&self, intent: &InstallIntent) -> Result<bool> {
        let row = sqlx::query(
            "SELECT 1 AS one FROM authority_install_intents WHERE idempotency_key = $1",
        )
        .bind(intent.key.as_str())
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.is_some())
    }

    /// Install intents still open, oldest first.
    pub async fn open_installs(&self, limit: u32) -> Result<Vec<InstallIntent>> {
        let rows = sqlx::query(
            "SELECT idempotency_key, region, account_id, body, created_ms \
             FROM authority_install_intents ORDER BY created_ms, idempotency_key LIMIT $1",
        )
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(intent_of).collect()
    }

    /// One account's install intents still open in one region, oldest first.
    pub async fn open_installs_of(
        &self,
        region: &RegionId,
        account: &AccountId,
        limit: u32,
    ) -> Result<Vec<InstallIntent>> {
        let rows = sqlx::query(
            "SELECT idempotency_key, region, account_id, body, created_ms \
             FROM authority_install_intents WHERE region = $1 AND account_id = $2 \
             ORDER BY created_ms, idempotency_key LIMIT $3",
        )
        .bind(region.as_str())
        .bind(account.as_str())
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(intent_of).collect()
    }

    /// Counts credits as given back after the region's store gave them back.
    pub async fn add_taken_back(
        &self,
        region: &RegionId,
        account: &AccountId,
        grant: &str,
        amount: i64,
    ) -> Result<()> {
        self.add_allocation_column(region, account, grant, "taken_back", amount)
            .await
    }

    async fn add_allocation_column(
        &self,
        region: &RegionId,
        account: &AccountId,
        grant: &str,
        column: &str,
        amount: i64,
    ) -> Result<()> {
        let (installed, taken_back) = if column == "installed" {
            (amount, 0)
        } else {
            (0, amount)
        };
        sqlx::query(&format!(
            "INSERT INTO authority_allocations (region, account_id, grant_id, installed, \
             taken_back, spent) VALUES ($1, $2, $3, $4, $5, 0) \
             ON CONFLICT (region, account_id, grant_id) \
             DO UPDATE SET {column} = authority_allocations.{column} + excluded.{column}"
        ))
        .bind(region.as_str())
        .bind(account.as_str())
        .bind(grant)
        .bind(installed)
        .bind(taken_back)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Drops the counters of a closed grant: no usage of it can arrive any more.
    pub async fn forget_allocations_of(&self, account: &AccountId, grant: &str) -> Result<()> {
        sqlx::query("DELETE FROM authority_allocations WHERE account_id = $1 AND grant_id = $2")
            .bind(account.as_str())
            .bind(grant)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Records an allocation to a region; returns its generation (grows by one each time).
    pub async fn note_allocation(
        &self,
        region: &RegionId,
        account: &AccountId,
        now: Timestamp,
    ) -> Result<u64> {
        let row = sqlx::query(
            "INSERT INTO authority_region_accounts (region, account_id, pool, burn_micros_per_s, \
             last_usage_ms, last_allocation_ms, generation) VALUES ($1, $2, 0, 0, $3, $3, 1) \
             ON CONFLICT (region, account_id) DO UPDATE SET \
             last_allocation_ms = excluded.last_allocation_ms, \
             generation = authority_region_accounts.generation + 1 RETURNING generation",
        )
        .bind(region.as_str())
        .bind(account.as_str())
        .bind(now.millis())
        .fetch_one(&self.pool)
        .await?;
        u64::try_from(int(&row, "generation")?).map_err(AuthorityError::corrupt)
    }

    pub async fn region_account(
        &self,
        region: &RegionId,
        account: &AccountId,
    ) -> Result<Option<RegionAccount>> {
        let row = sqlx::query(&format!(
            "{SELECT_REGION_ACCOUNT} WHERE a.region = $1 AND a.account_id = $2"
        ))
        .bind(region.as_str())
        .bind(account.as_str())
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(region_account_of).transpose()
    }

    /// Accounts allocated in some region, least recently used first.
    pub async fn region_accounts(&self, limit: u32) -> Result<Vec<RegionAccount>> {
        let rows = sqlx::query(&format!(
            "{SELECT_REGION_ACCOUNT} ORDER BY a.last_usage_ms LIMIT $1"
        ))
        .bind(count(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(region_account_of).collect()
    }

    /// Remembers, per account, the highest usage record number of a region that is reconciled
    /// (applied, or parked for an operator). Never moves back.
    pub async fn record_usage_seq(
        &self,
        region: &RegionId,
        seqs: &[(AccountId, u64)],
    ) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        for (account, seq) in seqs {
            sqlx::query(
                "INSERT INTO authority_usage_seq (region, account_id, seq) VALUES ($1, $2, $3) \
                 ON CONFLICT (region, account_id) DO UPDATE SET seq = CASE \
                 WHEN excluded.seq > authority_usage_seq.seq THEN excluded.seq \
                 ELSE authority_usage_seq.seq END",
            )
            .bind(region.as_str())
            .bind(account.as_str())
            .bind(i64::try_from(*seq).map_err(AuthorityError::corrupt)?)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// The highest usage record number of the account reconciled from the region (0: none).
    pub async fn usage_seq(&self, region: &RegionId, account: &AccountId) -> Result<u64> {
        let row = sqlx::query(
            "SELECT seq FROM authority_usage_seq WHERE region = $1 AND account_id = $2",
        )
        .bind(region.as_str())
        .bind(account.as_str())
        .fetch_optional(&self.pool)
        .await?;
        match row {
            Some(row) => u64::try_from(int(&row, "seq")?).map_err(AuthorityError::corrupt),
            None => Ok(0),
        }
    }

    pub async fn forget_region_account(
        &self,
        region: &RegionId,
        account: &AccountId,
    ) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        for table in ["authority_region_accounts", "authority_region_spend"] {
            sqlx::query(&format!(
                "DELETE FROM {table} WHERE region = $1 AND account_id = $2"
            ))
            .bind(region.as_str())
            .bind(account.as_str())
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Forgets everything the authority believes `region` holds, for a region whose store
    /// started again empty (the embedded node's in-memory region after a restart): every
    /// allocation counter of the region is marked taken back (nothing outstanding, overdraft
    /// room included), and its install intents, account rows, usage record numbers and
    /// applied-usage markers are dropped, in one transaction. Call it only once the region's
    /// usage that can still be reconciled is in the ledger: from then on the ledger's remainder
    /// is free to allocate again.
    pub async fn forget_region_holdings(&self, region: &RegionId) -> Result<ForgottenHoldings> {
        let mut tx = self.pool.begin().await?;
        let counters = sqlx::query(
            "UPDATE authority_allocations SET taken_back = installed - spent \
             WHERE region = $1 AND installed - taken_back - spent <> 0",
        )
        .bind(region.as_str())
        .execute(&mut *tx)
        .await?
        .rows_affected();
        let mut dropped = [0_u64; 4];
        // Intents would install into the empty region credits the counters no longer count;
        // record numbers and markers start over with the region's new stream.
        for (index, table) in [
            "authority_install_intents",
            "authority_region_accounts",
            "authority_usage_seq",
            "authority_applied_usage",
        ]
        .into_iter()
        .enumerate()
        {
            dropped[index] = sqlx::query(&format!("DELETE FROM {table} WHERE region = $1"))
                .bind(region.as_str())
                .execute(&mut *tx)
                .await?
                .rows_affected();
        }
        // The size of spends goes with the account rows it belongs to (not counted apart).
        sqlx::query("DELETE FROM authority_region_spend WHERE region = $1")
            .bind(region.as_str())
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        let [install_intents, accounts, usage_seqs, usage_markers] = dropped;
        Ok(ForgottenHoldings {
            counters,
            install_intents,
            accounts,
            usage_seqs,
            usage_markers,
        })
    }

    // ---- Catalogue --------------------------------------------------------------------------

    /// Stores a document under a natural key: the same content again is a replay, different
    /// content a conflict. Returns whether it was new.
    async fn put_once(
        &self,
        table: &str,
        key_column: &str,
        key: Key<'_>,
        body: &str,
    ) -> Result<bool> {
        let insert = format!(
            "INSERT INTO {table} ({key_column}, body) VALUES ($1, $2) \
             ON CONFLICT ({key_column}) DO NOTHING"
        );
        let select = format!("SELECT body FROM {table} WHERE {key_column} = $1");
        let (inserted, stored) = match key {
            Key::Text(key) => {
                let done = sqlx::query(&insert)
                    .bind(key)
                    .bind(body)
                    .execute(&self.pool)
                    .await?;
                let row = sqlx::query(&select).bind(key).fetch_one(&self.pool).await?;
                (done.rows_affected() == 1, text(&row, "body")?)
            }
            Key::Int(key) => {
                let done = sqlx::query(&insert)
                    .bind(key)
                    .bind(body)
                    .execute(&self.pool)
                    .await?;
                let row = sqlx::query(&select).bind(key).fetch_one(&self.pool).await?;
                (done.rows_affected() == 1, text(&row, "body")?)
            }
        };
        if !inserted && stored != body {
            return Err(AuthorityError::Conflict(format!("{key_column} {key}")));
        }
        Ok(inserted)
    }

    pub async fn define_feature(&self, feature: &Feature) -> Result<bool> {
        self.put_once(
            "authority_features",
            "feature",
            Key::Text(feature.feature.as_str()),
            &json(feature)?,
        )
        .await
    }

    /// Stores a plan once: the same plan again is a replay (false), another is a conflict.
    pub async fn define_plan(&self, plan: &crate::plans::Plan) -> Result<bool> {
        self.put_once(
            "authority_plans",
            "plan_id",
            Key::Text(plan.id.as_str()),
            &json(plan)?,
        )
        .await
    }

    pub async fn plan(&self, id: &tollgate_core::PlanId) -> Result<Option<crate::plans::Plan>> {
        let row = sqlx::query("SELECT body FROM authority_plans WHERE plan_id = $1")
            .bind(id.as_str())
            .fetch_optional(&self.pool)
            .await?;
        row.map(|row| from_json(&text(&row, "body")?)).transpose()
    }

    pub async fn plans(&self, after: &str, limit: u32) -> Result<Vec<crate::plans::Plan>> {
        let rows = sqlx::query(
            "SELECT body FROM authority_plans WHERE plan_id > $1 ORDER BY plan_id LIMIT $2",
        )
        .bind(after)
        .bind(count(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| from_json(&text(row, "body")?))
            .collect()
    }

    pub async fn contracts(&self, account: &AccountId) -> Result<Vec<tollgate_core::Contract>> {
        let row = sqlx::query("SELECT body FROM authority_contracts WHERE account_id = $1")
            .bind(account.as_str())
            .fetch_optional(&self.pool)
            .await?;
        match row {
            Some(row) => from_json(&text(&row, "body")?),
            None => Ok(Vec::new()),
        }
    }

    pub async fn set_contracts(
        &self,
        account: &AccountId,
        contracts: &[tollgate_core::Contract],
    ) -> Result<()> {
        sqlx::query(
            "INSERT INTO authority_contracts (account_id, body) VALUES ($1, $2) \
             ON CONFLICT (account_id) DO UPDATE SET body = excluded.body",
        )
        .bind(account.as_str())
        .bind(json(&contracts)?)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn features(&self, after: &str, limit: u32) -> Result<Vec<Feature>> {
        let rows = sqlx::query(
            "SELECT body FROM authority_features WHERE feature > $1 ORDER BY feature LIMIT $2",
        )
        .bind(after)
        .bind(count(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| from_json(&text(row, "body")?))
            .collect()
    }

    /// The unit of each of `features` that is defined (an undefined one is left out).
    pub async fn feature_units(
        &self,
        features: &[&tollgate_core::FeatureKey],
    ) -> Result<HashMap<tollgate_core::FeatureKey, String>> {
        let mut units = HashMap::new();
        for feature in features {
            let row = sqlx::query("SELECT body FROM authority_features WHERE feature = $1")
                .bind(feature.as_str())
                .fetch_optional(&self.pool)
                .await?;
            if let Some(row) = row {
                let defined: Feature = from_json(&text(&row, "body")?)?;
                units.insert(defined.feature, defined.unit);
            }
        }
        Ok(units)
    }

    pub async fn put_price_version(&self, version: &PriceBookVersion) -> Result<bool> {
        let number = i64::try_from(version.version)
            .map_err(|_| AuthorityError::invalid("version", "too large"))?;
        let stored = sqlx::query("SELECT COUNT(*) AS n FROM authority_price_versions")
            .fetch_one(&self.pool)
            .await?;
        if int(&stored, "n")? >= PRICE_VERSIONS_MAX {
            return Err(AuthorityError::invalid(
                "version",
                format!("at most {PRICE_VERSIONS_MAX} versions are kept"),
            ));
        }
        self.put_once(
            "authority_price_versions",
            "version",
            Key::Int(number),
            &json(version)?,
        )
        .await
    }

    /// Every version, oldest number first.
    pub async fn price_versions(&self) -> Result<Vec<PriceBookVersion>> {
        let rows = sqlx::query("SELECT body FROM authority_price_versions ORDER BY version")
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|row| from_json(&text(row, "body")?))
            .collect()
    }

    // ---- Schedules ----------------------------------------------------------------------------

    /// Creates a schedule; the same schedule again is a replay, a different one a conflict.
    pub async fn create_schedule(&self, record: &ScheduleRecord) -> Result<ScheduleRecord> {
        let existing = self.schedule(&record.account, &record.schedule.id).await?;
        if let Some(existing) = existing {
            if existing.schedule == record.schedule && existing.ends_at == record.ends_at {
                return Ok(existing);
            }
            return Err(AuthorityError::Conflict(format!(
                "schedule {}",
                record.schedule.id
            )));
        }
        let row =
            sqlx::query("SELECT COUNT(*) AS n FROM authority_schedules WHERE account_id = $1")
                .bind(record.account.as_str())
                .fetch_one(&self.pool)
                .await?;
        if int(&row, "n")? >= SCHEDULES_PER_ACCOUNT_MAX {
            return Err(AuthorityError::invalid(
                "schedule",
                format!("at most {SCHEDULES_PER_ACCOUNT_MAX} schedules per account"),
            ));
        }
        sqlx::query(
            "INSERT INTO authority_schedules (account_id, schedule_id, body, cancelled_ms, \
             next_issue, next_issue_ms, next_close, next_close_ms) \
             VALUES ($1, $2, $3, NULL, $4, $5, $6, $7) \
             ON CONFLICT (account_id, schedule_id) DO NOTHING",
        )
        .bind(record.account.as_str())
        .bind(record.schedule.id.as_str())
        .bind(json(&(&record.schedule, record.ends_at))?)
        .bind(to_i64(record.next_issue)?)
        .bind(record.next_issue_at.millis())
        .bind(to_i64(record.next_close)?)
        .bind(record.next_close_at.millis())
        .execute(&self.pool)
        .await?;
        Ok(record.clone())
    }

    pub async fn schedule(&self, account: &AccountId, id: &str) -> Result<Option<ScheduleRecord>> {
        let row = sqlx::query(&format!(
            "{SCHEDULE_SELECT} WHERE account_id = $1 AND schedule_id = $2"
        ))
        .bind(account.as_str())
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(schedule_of).transpose()
    }

    pub async fn schedules(
        &self,
        account: &AccountId,
        after: &str,
        limit: u32,
    ) -> Result<Vec<ScheduleRecord>> {
        let rows = sqlx::query(&format!(
            "{SCHEDULE_SELECT} WHERE account_id = $1 AND schedule_id > $2 \
             ORDER BY schedule_id LIMIT $3"
        ))
        .bind(account.as_str())
        .bind(after)
        .bind(count(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(schedule_of).collect()
    }

    /// Schedules with a period to issue by `now` or to close by `close_by`.
    pub async fn due_schedules(
        &self,
        now: Timestamp,
        close_by: Timestamp,
        limit: u32,
    ) -> Result<Vec<ScheduleRecord>> {
        let rows = sqlx::query(&format!(
            "{SCHEDULE_SELECT} WHERE ((cancelled_ms IS NULL OR next_issue_ms < cancelled_ms) \
             AND next_issue_ms <= $1) \
             OR (next_close < next_issue AND next_close_ms <= $2) \
             ORDER BY account_id, schedule_id LIMIT $3"
        ))
        .bind(now.millis())
        .bind(close_by.millis())
        .bind(count(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(schedule_of).collect()
    }

    /// Saves how far a schedule has been taken.
    pub async fn save_schedule_progress(&self, record: &ScheduleRecord) -> Result<()> {
        sqlx::query(
            "UPDATE authority_schedules SET next_issue = $1, next_issue_ms = $2, \
             next_close = $3, next_close_ms = $4, cancelled_ms = $5 \
             WHERE account_id = $6 AND schedule_id = $7",
        )
        .bind(to_i64(record.next_issue)?)
        .bind(record.next_issue_at.millis())
        .bind(to_i64(record.next_close)?)
        .bind(record.next_close_at.millis())
        .bind(record.cancelled_at.map(Timestamp::millis))
        .bind(record.account.as_str())
        .bind(record.schedule.id.as_str())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    // ---- Account settings ---------------------------------------------------------------------

    pub async fn account_settings(&self, account: &AccountId) -> Result<AccountSettings> {
        let row = sqlx::query("SELECT body FROM authority_account_settings WHERE account_id = $1")
            .bind(account.as_str())
            .fetch_optional(&self.pool)
            .await?;
        match row {
            Some(row) => from_json(&text(&row, "body")?),
            None => Ok(AccountSettings::default()),
        }
    }

    pub async fn set_account_settings(
        &self,
        account: &AccountId,
        settings: &AccountSettings,
    ) -> Result<()> {
        sqlx::query(
            "INSERT INTO authority_account_settings (account_id, body) VALUES ($1, $2) \
             ON CONFLICT (account_id) DO UPDATE SET body = excluded.body",
        )
        .bind(account.as_str())
        .bind(json(settings)?)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    // ---- Notifications --------------------------------------------------------------------------

    pub async fn notify_state(&self, account: &AccountId) -> Result<(u64, NotifyFlags)> {
        let row = sqlx::query(
            "SELECT cursor_seq, flags FROM authority_notify_state WHERE account_id = $1",
        )
        .bind(account.as_str())
        .fetch_optional(&self.pool)
        .await?;
        match row {
            Some(row) => Ok((
                u64::try_from(int(&row, "cursor_seq")?).map_err(AuthorityError::corrupt)?,
                from_json(&text(&row, "flags")?)?,
            )),
            None => Ok((0, NotifyFlags::default())),
        }
    }

    /// Commits one notifier pass over an account, all or nothing: the new cursor and flags,
    /// the events (into the outbox, with a delivery per endpoint) and a top-up attempt. Returns
    /// false, writing nothing, when another pass moved the cursor first.
    pub async fn commit_scan(&self, scan: &ScanCommit<'_>) -> Result<bool> {
        let mut tx = self.pool.begin().await?;
        let claimed = if scan.old_cursor == 0 {
            sqlx::query(
                "INSERT INTO authority_notify_state (account_id, cursor_seq, flags) \
                 VALUES ($1, $2, $3) ON CONFLICT (account_id) DO UPDATE SET \
                 cursor_seq = excluded.cursor_seq, flags = excluded.flags \
                 WHERE authority_notify_state.cursor_seq = 0",
            )
            .bind(scan.account.as_str())
            .bind(to_i64(scan.new_cursor)?)
            .bind(json(scan.flags)?)
            .execute(&mut *tx)
            .await?
        } else {
            sqlx::query(
                "UPDATE authority_notify_state SET cursor_seq = $1, flags = $2 \
                 WHERE account_id = $3 AND cursor_seq = $4",
            )
            .bind(to_i64(scan.new_cursor)?)
            .bind(json(scan.flags)?)
            .bind(scan.account.as_str())
            .bind(to_i64(scan.old_cursor)?)
            .execute(&mut *tx)
            .await?
        };
        if claimed.rows_affected() != 1 {
            return Ok(false);
        }
        for event in scan.events {
            Self::insert_event_tx(&mut tx, event, scan.endpoints, scan.now).await?;
        }
        if let Some(attempt) = scan.top_up {
            Self::insert_topup_tx(&mut tx, attempt, scan.now).await?;
        }
        tx.commit().await?;
        Ok(true)
    }

    /// Adds an event to the outbox unless its id is there already; returns whether it was new.
    pub async fn insert_event(
        &self,
        event: &Event,
        endpoints: &[String],
        now: Timestamp,
    ) -> Result<bool> {
        let mut tx = self.pool.begin().await?;
        let new = Self::insert_event_tx(&mut tx, event, endpoints, now).await?;
        tx.commit().await?;
        Ok(new)
    }

    async fn insert_event_tx(
        tx: &mut sqlx::Transaction<'static, sqlx::Any>,
        event: &Event,
        endpoints: &[String],
        now: Timestamp,
    ) -> Result<bool> {
        let done = sqlx::query(
            "INSERT INTO authority_outbox (event_id, account_id, kind, body) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (event_id) DO NOTHING",
        )
        .bind(event.event_id.as_str())
        .bind(event.account.as_str())
        .bind(event.kind.as_str())
        .bind(json(event)?)
        .execute(&mut **tx)
        .await?;
        if done.rows_affected() == 0 {
            return Ok(false);
        }
        for endpoint in endpoints {
            sqlx::query(
                "INSERT INTO authority_deliveries (event_id, endpoint, attempts, next_attempt_ms, \
                 state, last_error) VALUES ($1, $2, 0, $3, 'pending', '') \
                 ON CONFLICT (event_id, endpoint) DO NOTHING",
            )
            .bind(event.event_id.as_str())
            .bind(endpoint.as_str())
            .bind(now.millis())
            .execute(&mut **tx)
            .await?;
        }
        Ok(true)
    }

    /// Events after outbox position `after`, oldest first, with their positions.
    pub async fn events_after(
        &self,
        after: i64,
        account: Option<&AccountId>,
        limit: u32,
    ) -> Result<Vec<(i64, Event)>> {
        let rows = sqlx::query(
            "SELECT seq, body FROM authority_outbox WHERE seq > $1 \
             AND ($2 = '' OR account_id = $2) ORDER BY seq LIMIT $3",
        )
        .bind(after)
        .bind(account.map_or("", AccountId::as_str))
        .bind(count(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| Ok((int(row, "seq")?, from_json(&text(row, "body")?)?)))
            .collect()
    }

    /// The outbox position of an event id (to resume a watch after it).
    pub async fn event_position(&self, event_id: &str) -> Result<Option<i64>> {
        let row = sqlx::query("SELECT seq FROM authority_outbox WHERE event_id = $1")
            .bind(event_id)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|row| int(&row, "seq")).transpose()
    }

    pub async fn events_of_kind(&self, kind: EventKind) -> Result<Vec<Event>> {
        let rows = sqlx::query("SELECT body FROM authority_outbox WHERE kind = $1 ORDER BY seq")
            .bind(kind.as_str())
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|row| from_json(&text(row, "body")?))
            .collect()
    }

    pub async fn due_deliveries(&self, now: Timestamp, limit: u32) -> Result<Vec<Delivery>> {
        let rows = sqlx::query(
            "SELECT d.event_id, d.endpoint, d.attempts, o.body FROM authority_deliveries d \
             JOIN authority_outbox o ON o.event_id = d.event_id \
             WHERE d.state = 'pending' AND d.next_attempt_ms <= $1 \
             ORDER BY d.next_attempt_ms, o.seq LIMIT $2",
        )
        .bind(now.millis())
        .bind(count(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                let event: Event = from_json(&text(row, "body")?)?;
                Ok(Delivery {
                    event_id: text(row, "event_id")?,
                    endpoint: text(row, "endpoint")?,
                    attempts: u32::try_from(int(row, "attempts")?).unwrap_or(u32::MAX),
                    body: event.webhook_body(),
                })
            })
            .collect()
    }

    /// Records one delivery attempt: delivered, retry at `next_attempt`, or given up.
    pub async fn delivery_attempted(
        &self,
        delivery: &Delivery,
        state: &str,
        next_attempt: Timestamp,
        error: &str,
    ) -> Result<()> {
        sqlx::query(
            "UPDATE authority_deliveries SET attempts = attempts + 1, state = $1, \
             next_attempt_ms = $2, last_error = $3 WHERE event_id = $4 AND endpoint = $5",
        )
        .bind(state)
        .bind(next_attempt.millis())
        .bind(error)
        .bind(delivery.event_id.as_str())
        .bind(delivery.endpoint.as_str())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn delivery_states(&self) -> Result<Vec<(String, String, u32, String)>> {
        let rows = sqlx::query(
            "SELECT event_id, endpoint, attempts, state FROM authority_deliveries ORDER BY event_id",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                Ok((
                    text(row, "event_id")?,
                    text(row, "endpoint")?,
                    u32::try_from(int(row, "attempts")?).unwrap_or(u32::MAX),
                    text(row, "state")?,
                ))
            })
            .collect()
    }

    // ---- Top-ups --------------------------------------------------------------------------------

    async fn insert_topup_tx(
        tx: &mut sqlx::Transaction<'static, sqlx::Any>,
        attempt: &TopUpAttempt,
        now: Timestamp,
    ) -> Result<()> {
        sqlx::query(
            "INSERT INTO authority_topups (attempt_id, account_id, month, amount, state, tries, \
             next_try_ms, last_error, created_ms) VALUES ($1, $2, $3, $4, $5, 0, $6, $7, $6) \
             ON CONFLICT (attempt_id) DO NOTHING",
        )
        .bind(attempt.attempt_id.as_str())
        .bind(attempt.account.as_str())
        .bind(attempt.month.as_str())
        .bind(attempt.amount.micros())
        .bind(attempt.state.as_str())
        .bind(now.millis())
        .bind(attempt.last_error.as_str())
        .execute(&mut **tx)
        .await?;
        Ok(())
    }

    /// Credits topped up (or being topped up) for an account in a month.
    pub async fn topped_up_in_month(&self, account: &AccountId, month: &str) -> Result<Credits> {
        let row = sqlx::query(
            "SELECT CAST(COALESCE(SUM(amount), 0) AS BIGINT) AS total FROM authority_topups \
             WHERE account_id = $1 AND month = $2 AND state IN ('pending', 'succeeded')",
        )
        .bind(account.as_str())
        .bind(month)
        .fetch_one(&self.pool)
        .await?;
        Ok(Credits::from_micros(int(&row, "total")?))
    }

    pub async fn due_topups(&self, now: Timestamp, limit: u32) -> Result<Vec<TopUpAttempt>> {
        let rows = sqlx::query(
            "SELECT attempt_id, account_id, month, amount, state, tries, last_error \
             FROM authority_topups WHERE state = 'pending' AND next_try_ms <= $1 \
             ORDER BY next_try_ms LIMIT $2",
        )
        .bind(now.millis())
        .bind(count(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(topup_of).collect()
    }

    pub async fn topups(&self, account: &AccountId) -> Result<Vec<TopUpAttempt>> {
        let rows = sqlx::query(
            "SELECT attempt_id, account_id, month, amount, state, tries, last_error \
             FROM authority_topups WHERE account_id = $1 ORDER BY created_ms, attempt_id",
        )
        .bind(account.as_str())
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(topup_of).collect()
    }

    /// Records a top-up try: its new state, when to try again, and the event to announce (in
    /// the same transaction, so a finished top-up is announced exactly once).
    pub async fn topup_tried(
        &self,
        attempt: &TopUpAttempt,
        next_try: Timestamp,
        event: Option<(&Event, &[String])>,
        now: Timestamp,
    ) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "UPDATE authority_topups SET state = $1, tries = $2, next_try_ms = $3, \
             last_error = $4 WHERE attempt_id = $5",
        )
        .bind(attempt.state.as_str())
        .bind(count(attempt.tries))
        .bind(next_try.millis())
        .bind(attempt.last_error.as_str())
        .bind(attempt.attempt_id.as_str())
        .execute(&mut *tx)
        .await?;
        if let Some((event, endpoints)) = event {
            Self::insert_event_tx(&mut tx, event, endpoints, now).await?;
        }
        tx.commit().await?;
        Ok(())
    }
}

/// What one notifier pass over an account commits.
pub struct ScanCommit<'a> {
    pub account: &'a AccountId,
    pub old_cursor: u64,
    pub new_cursor: u64,
    pub flags: &'a NotifyFlags,
    pub events: &'a [Event],
    pub top_up: Option<&'a TopUpAttempt>,
    pub endpoints: &'a [String],
    pub now: Timestamp,
}

#[derive(Clone, Copy)]
enum Key<'a> {
    Text(&'a str),
    Int(i64),
}

impl std::fmt::Display for Key<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Key::Text(text) => f.write_str(text),
            Key::Int(number) => write!(f, "{number}"),
        }
    }
}

/// A billable action and the unit it is counted in.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Feature {
    pub feature: tollgate_core::FeatureKey,
    pub unit: String,
    pub description: String,
}

const SCHEDULE_SELECT: &str = "SELECT account_id, body, cancelled_ms, next_issue, \
    next_issue_ms, next_close, next_close_ms FROM authority_schedules";

fn schedule_of(row: &AnyRow) -> Result<ScheduleRecord> {
    let (schedule, ends_at): (tollgate_core::GrantSchedule, Option<Timestamp>) =
        from_json(&text(row, "body")?)?;
    Ok(ScheduleRecord {
        account: id(row, "account_id")?,
        schedule,
        ends_at,
        cancelled_at: row
            .try_get::<Option<i64>, _>("cancelled_ms")?
            .map(time)
            .transpose()?,
        next_issue: to_u64(int(row, "next_issue")?)?,
        next_issue_at: time(int(row, "next_issue_ms")?)?,
        next_close: to_u64(int(row, "next_close")?)?,
        next_close_at: time(int(row, "next_close_ms")?)?,
    })
}

fn region_account_of(row: &AnyRow) -> Result<RegionAccount> {
    Ok(RegionAccount {
        region: id(row, "region")?,
        account: id(row, "account_id")?,
        pool: int(row, "pool")?,
        burn_micros_per_s: int(row, "burn_micros_per_s")?,
        last_usage_ms: int(row, "last_usage_ms")?,
        last_allocation_ms: int(row, "last_allocation_ms")?,
        generation: int(row, "generation")?,
        spend_micros: row.try_get::<Option<i64>, _>("spend_micros")?.unwrap_or(0),
    })
}

fn topup_of(row: &AnyRow) -> Result<TopUpAttempt> {
    Ok(TopUpAttempt {
        attempt_id: text(row, "attempt_id")?,
        account: id(row, "account_id")?,
        month: text(row, "month")?,
        amount: Credits::from_micros(int(row, "amount")?),
        state: text(row, "state")?,
        tries: u32::try_from(int(row, "tries")?).unwrap_or(u32::MAX),
        last_error: text(row, "last_error")?,
    })
}

fn to_i64(value: u64) -> Result<i64> {
    i64::try_from(value).map_err(|_| AuthorityError::invalid("index", "too large"))
}

fn to_u64(value: i64) -> Result<u64> {
    u64::try_from(value).map_err(AuthorityError::corrupt)
}

/// The grant id of an allocation row, or `None` for the overdraft room.
pub fn allocation_grant(row: &AllocationRow) -> Option<GrantId> {
    GrantId::new(row.grant_id.as_str()).ok()
}

fn intent_of(row: &AnyRow) -> Result<InstallIntent> {
    Ok(InstallIntent {
        key: IdempotencyKey::new(text(row, "idempotency_key")?).map_err(AuthorityError::corrupt)?,
        region: RegionId::new(text(row, "region")?).map_err(AuthorityError::corrupt)?,
        account: AccountId::new(text(row, "account_id")?).map_err(AuthorityError::corrupt)?,
        spec: from_json(&text(row, "body")?)?,
        created_at: Timestamp::from_millis(int(row, "created_ms")?)
            .map_err(AuthorityError::corrupt)?,
    })
}

#[cfg(test)]
mod tests {
    use super::decayed_spend_micros;

    #[test]
    fn the_size_of_spends_takes_a_larger_spend_at_once_and_decays_over_smaller_ones() {
        assert_eq!(decayed_spend_micros(0, 40), 40);
        assert_eq!(decayed_spend_micros(40, 40), 40);
        assert_eq!(decayed_spend_micros(40, 100), 100);
        // A smaller spend: 10 % less, but never under that spend.
        assert_eq!(decayed_spend_micros(100, 1), 90);
        assert_eq!(decayed_spend_micros(100, 95), 95);
        let mut size = 1_000_000;
        for _ in 0..7 {
            size = decayed_spend_micros(size, 1);
        }
        assert!((400_000..=500_000).contains(&size), "{size}");
    }
}
