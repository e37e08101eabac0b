//! Parked usage: what a region served that the ledger could not take, one row per record,
//! with everything needed to charge it later, and how an operator resolved it.
//!
//! The table `authority_parked` replaces reading `authority_parked_usage` (kept, and still
//! written, for the simulation's count): it has an id an operator can name, the record's
//! parts in columns, and the resolution. At start, rows of the old table that the new one
//! lacks are copied in, their parts read back from the record's description (a migration of
//! databases parked into before this table existed).
//!
//! What a record was priced with (its quantity and rate, when the caller asked for units) is in
//! `authority_parked_price`, one row per parked record that has them: a table of its own, so
//! databases that parked before it existed need no change to `authority_parked`.
//!
//! States: `open` (waiting), `charging` (a CHARGE under `resolution_key` is in flight: its
//! planned debit is in `charge`, so a retry applies the same debit again), `resolved`.

use sqlx::any::AnyRow;
use sqlx::AnyPool;
use tollgate_core::{
    AccountId, Credits, Draw, GrantId, PriceRule, Quantity, Rate, RegionId, Timestamp,
};

use super::{count, int, opt_text, text, time, StateStore};
use crate::error::{AuthorityError, Result};

/// Most parked records one read returns.
pub const PARKED_PAGE_MAX: u32 = 1_000;

const PARKED_COLUMNS: &str = "region TEXT NOT NULL, usage_id TEXT NOT NULL, \
     account_id TEXT NOT NULL, kind TEXT NOT NULL, usage_key TEXT NOT NULL, \
     reason TEXT NOT NULL, feature TEXT NOT NULL, cost_micros BIGINT NOT NULL, \
     draws TEXT NOT NULL, overdraft_micros BIGINT NOT NULL, event_ms BIGINT NOT NULL, \
     price_version BIGINT NOT NULL, price_rule TEXT NOT NULL, actor TEXT NOT NULL, \
     hold_id TEXT NOT NULL, description TEXT NOT NULL, parked_ms BIGINT NOT NULL, \
     state TEXT NOT NULL, resolution TEXT NOT NULL, resolution_key TEXT NOT NULL, \
     resolved_by TEXT NOT NULL, resolution_reason TEXT NOT NULL, resolved_ms BIGINT NOT NULL, \
     charge TEXT NOT NULL, debit_id TEXT NOT NULL, charged_micros BIGINT NOT NULL, \
     UNIQUE (region, usage_id)";
const PARKED_INDEXES: &[&str] = &[
    "CREATE INDEX IF NOT EXISTS authority_parked_state ON authority_parked (state, parked_id)",
    "CREATE INDEX IF NOT EXISTS authority_parked_account ON authority_parked \
     (account_id, parked_id)",
];

const PRICE_TABLE: &str = "CREATE TABLE IF NOT EXISTS authority_parked_price (\
     region TEXT NOT NULL, usage_id TEXT NOT NULL, quantity TEXT NOT NULL, rate TEXT NOT NULL, \
     PRIMARY KEY (region, usage_id))";

const SELECT: &str = "SELECT parked_id, region, usage_id, account_id, kind, usage_key, reason, \
     feature, cost_micros, draws, overdraft_micros, event_ms, price_version, price_rule, actor, \
     hold_id, description, parked_ms, state, resolution, resolution_key, resolved_by, \
     resolution_reason, resolved_ms, charge, debit_id, charged_micros, \
     (SELECT q.quantity FROM authority_parked_price q WHERE q.region = authority_parked.region \
     AND q.usage_id = authority_parked.usage_id) AS quantity, \
     (SELECT q.rate FROM authority_parked_price q WHERE q.region = authority_parked.region \
     AND q.usage_id = authority_parked.usage_id) AS rate FROM authority_parked";

pub(super) async fn create_tables(pool: &AnyPool, sqlite: bool) -> Result<()> {
    let id = if sqlite {
        "parked_id INTEGER PRIMARY KEY AUTOINCREMENT"
    } else {
        "parked_id BIGSERIAL PRIMARY KEY"
    };
    sqlx::query(&format!(
        "CREATE TABLE IF NOT EXISTS authority_parked ({id}, {PARKED_COLUMNS})"
    ))
    .execute(pool)
    .await?;
    for statement in PARKED_INDEXES {
        sqlx::query(statement).execute(pool).await?;
    }
    sqlx::query(PRICE_TABLE).execute(pool).await?;
    backfill(pool).await
}

/// Copies rows parked before `authority_parked` existed (see the module's comment).
async fn backfill(pool: &AnyPool) -> Result<()> {
    let rows = sqlx::query(
        "SELECT p.region, p.usage_id, p.account_id, p.reason, p.record, p.parked_ms \
         FROM authority_parked_usage p WHERE NOT EXISTS (SELECT 1 FROM authority_parked a \
         WHERE a.region = p.region AND a.usage_id = p.usage_id) ORDER BY p.parked_ms",
    )
    .fetch_all(pool)
    .await?;
    for row in &rows {
        let new = NewParked::from_description(
            &text(row, "region")?,
            &text(row, "usage_id")?,
            &text(row, "account_id")?,
            &text(row, "reason")?,
            &text(row, "record")?,
        );
        insert(pool, &new, int(row, "parked_ms")?).await?;
    }
    Ok(())
}

/// Where a parked record stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParkedState {
    Open,
    /// A CHARGE is in flight (see the module's comment); listed as open.
    Charging,
    Resolved,
}

impl ParkedState {
    pub fn as_str(self) -> &'static str {
        match self {
            ParkedState::Open => "open",
            ParkedState::Charging => "charging",
            ParkedState::Resolved => "resolved",
        }
    }

    fn parse(text: &str) -> Result<Self> {
        match text {
            "open" => Ok(ParkedState::Open),
            "charging" => Ok(ParkedState::Charging),
            "resolved" => Ok(ParkedState::Resolved),
            other => Err(AuthorityError::corrupt(format!("parked state {other}"))),
        }
    }
}

/// A record to park: the region's usage record in parts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewParked {
    pub region: String,
    pub usage_id: String,
    pub account: String,
    /// `debit`, `capture` or `reverse`.
    pub kind: String,
    pub key: String,
    pub reason: String,
    pub feature: String,
    pub cost: Credits,
    pub draws: Vec<Draw>,
    pub overdraft: Credits,
    pub at: Timestamp,
    /// 0 when unknown.
    pub price_version: u64,
    pub price_rule: Option<PriceRule>,
    /// The units the caller asked for and the credits per unit they were priced at; `None`
    /// when the caller named the cost, and for records parked before prices were kept.
    pub quantity: Option<Quantity>,
    pub rate: Option<Rate>,
    pub actor: String,
    pub hold_id: String,
    pub description: String,
}

impl NewParked {
    /// From a region's usage record.
    pub fn from_record(
        region: &RegionId,
        record: &tollgate_region::UsageRecord,
        reason: &str,
        description: &str,
    ) -> Self {
        NewParked {
            region: region.to_string(),
            usage_id: record.id.0.clone(),
            account: record.account.to_string(),
            kind: kind_name(record.kind).to_owned(),
            key: record.key.to_string(),
            reason: reason.to_owned(),
            feature: record.feature.to_string(),
            cost: record.cost,
            draws: record.draws.clone(),
            overdraft: record.overdraft,
            at: record.at,
            price_version: record.price.version,
            price_rule: Some(record.price.rule),
            quantity: record.price.quantity,
            rate: record.price.rate,
            actor: record
                .actor
                .as_ref()
                .map(ToString::to_string)
                .unwrap_or_default(),
            hold_id: record
                .hold_id
                .as_ref()
                .map(ToString::to_string)
                .unwrap_or_default(),
            description: description.to_owned(),
        }
    }

    /// From the reconciler's description of a record (`Debit key=K account=A feature=F
    /// at=T cost=C draws=["g=1"] overdraft=0`), which names everything but the price tag,
    /// the actor and the hold. What does not read back stays empty (cost 0, no draws): such a
    /// record can only be written off.
    pub fn from_description(
        region: &str,
        usage_id: &str,
        account: &str,
        reason: &str,
        description: &str,
    ) -> Self {
        let mut new = NewParked {
            region: region.to_owned(),
            usage_id: usage_id.to_owned(),
            account: account.to_owned(),
            kind: String::new(),
            key: String::new(),
            reason: reason.to_owned(),
            feature: String::new(),
            cost: Credits::ZERO,
            draws: Vec::new(),
            overdraft: Credits::ZERO,
            at: Timestamp::EPOCH,
            price_version: 0,
            price_rule: None,
            quantity: None,
            rate: None,
            actor: String::new(),
            hold_id: String::new(),
            description: description.to_owned(),
        };
        let _complete = parse_description(description, &mut new).is_some();
        new
    }
}

fn kind_name(kind: tollgate_region::UsageKind) -> &'static str {
    match kind {
        tollgate_region::UsageKind::Debit => "debit",
        tollgate_region::UsageKind::Capture => "capture",
        tollgate_region::UsageKind::Reverse => "reverse",
    }
}

/// Reads `describe`'s fields back from the right (the key may hold spaces).
fn parse_description(text: &str, new: &mut NewParked) -> Option<()> {
    let (kind, rest) = text.split_once(' ')?;
    new.kind = kind.to_ascii_lowercase();
    let rest = rest.strip_prefix("key=")?;
    let (rest, overdraft) = rest.rsplit_once(" overdraft=")?;
    let (rest, draws) = rest.rsplit_once(" draws=")?;
    let (rest, cost) = rest.rsplit_once(" cost=")?;
    let (rest, at) = rest.rsplit_once(" at=")?;
    let (rest, feature) = rest.rsplit_once(" feature=")?;
    let (key, _account) = rest.rsplit_once(" account=")?;
    new.key = key.to_owned();
    new.feature = feature.to_owned();
    new.at = Timestamp::parse_rfc3339(at).ok()?;
    new.cost = Credits::parse(cost).ok()?;
    new.overdraft = Credits::parse(overdraft).ok()?;
    let inner = draws.strip_prefix('[')?.strip_suffix(']')?;
    for part in inner.split(", ").filter(|p| !p.is_empty()) {
        let (grant, amount) = part.trim_matches('"').rsplit_once('=')?;
        new.draws.push(Draw {
            grant_id: GrantId::new(grant.to_owned()).ok()?,
            amount: Credits::parse(amount).ok()?,
        });
    }
    Some(())
}

async fn insert(pool: &AnyPool, new: &NewParked, parked_ms: i64) -> Result<()> {
    let draws = serde_json::to_string(&new.draws).map_err(AuthorityError::corrupt)?;
    let rule = new.price_rule.map(rule_name).unwrap_or_default();
    // The record and its price together, or neither.
    let mut tx = pool.begin().await?;
    sqlx::query(
        "INSERT INTO authority_parked (region, usage_id, account_id, kind, usage_key, reason, \
         feature, cost_micros, draws, overdraft_micros, event_ms, price_version, price_rule, \
         actor, hold_id, description, parked_ms, state, resolution, resolution_key, \
         resolved_by, resolution_reason, resolved_ms, charge, debit_id, charged_micros) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, \
         'open', '', '', '', '', 0, '', '', 0) ON CONFLICT (region, usage_id) DO NOTHING",
    )
    .bind(&new.region)
    .bind(&new.usage_id)
    .bind(&new.account)
    .bind(&new.kind)
    .bind(&new.key)
    .bind(&new.reason)
    .bind(&new.feature)
    .bind(new.cost.micros())
    .bind(draws)
    .bind(new.overdraft.micros())
    .bind(new.at.millis())
    .bind(i64::try_from(new.price_version).unwrap_or(i64::MAX))
    .bind(rule)
    .bind(&new.actor)
    .bind(&new.hold_id)
    .bind(&new.description)
    .bind(parked_ms)
    .execute(&mut *tx)
    .await?;
    if let (Some(quantity), Some(rate)) = (new.quantity, new.rate) {
        sqlx::query(
            "INSERT INTO authority_parked_price (region, usage_id, quantity, rate) \
             VALUES ($1, $2, $3, $4) ON CONFLICT (region, usage_id) DO NOTHING",
        )
        .bind(&new.region)
        .bind(&new.usage_id)
        .bind(quantity.to_string())
        .bind(rate.to_string())
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    Ok(())
}

fn rule_name(rule: PriceRule) -> String {
    serde_json::to_value(rule)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}

fn rule_of(name: &str) -> Option<PriceRule> {
    PriceRule::ALL.into_iter().find(|r| rule_name(*r) == name)
}

/// How a record was resolved.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParkedResolution {
    /// `charged` or `written_off`.
    pub resolution: String,
    pub by: String,
    pub reason: String,
    pub at: Timestamp,
    pub debit_id: String,
    pub charged: Credits,
}

/// A parked record as read back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParkedRow {
    pub id: i64,
    pub parked: NewParked,
    pub parked_at: Timestamp,
    pub state: ParkedState,
    /// The idempotency key of the resolution (done or in flight).
    pub resolution_key: String,
    /// The planned debit of a CHARGE in flight or done (JSON), empty otherwise.
    pub charge: String,
    pub resolution: Option<ParkedResolution>,
}

impl ParkedRow {
    pub fn account(&self) -> Result<AccountId> {
        AccountId::new(self.parked.account.clone()).map_err(AuthorityError::corrupt)
    }
}

fn row_of(row: &AnyRow) -> Result<ParkedRow> {
    let draws: Vec<Draw> =
        serde_json::from_str(&text(row, "draws")?).map_err(AuthorityError::corrupt)?;
    let state = ParkedState::parse(&text(row, "state")?)?;
    let resolution = match state {
        ParkedState::Resolved => Some(ParkedResolution {
            resolution: text(row, "resolution")?,
            by: text(row, "resolved_by")?,
            reason: text(row, "resolution_reason")?,
            at: time(int(row, "resolved_ms")?)?,
            debit_id: text(row, "debit_id")?,
            charged: Credits::from_micros(int(row, "charged_micros")?),
        }),
        _ => None,
    };
    Ok(ParkedRow {
        id: int(row, "parked_id")?,
        parked: NewParked {
            region: text(row, "region")?,
            usage_id: text(row, "usage_id")?,
            account: text(row, "account_id")?,
            kind: text(row, "kind")?,
            key: text(row, "usage_key")?,
            reason: text(row, "reason")?,
            feature: text(row, "feature")?,
            cost: Credits::from_micros(int(row, "cost_micros")?),
            draws,
            overdraft: Credits::from_micros(int(row, "overdraft_micros")?),
            at: time(int(row, "event_ms")?)?,
            price_version: u64::try_from(int(row, "price_version")?).unwrap_or_default(),
            price_rule: rule_of(&text(row, "price_rule")?),
            quantity: opt_text(row, "quantity")?
                .map(|q| Quantity::parse(&q).map_err(AuthorityError::corrupt))
                .transpose()?,
            rate: opt_text(row, "rate")?
                .map(|r| Rate::parse(&r).map_err(AuthorityError::corrupt))
                .transpose()?,
            actor: text(row, "actor")?,
            hold_id: text(row, "hold_id")?,
            description: text(row, "description")?,
        },
        parked_at: time(int(row, "parked_ms")?)?,
        state,
        resolution_key: text(row, "resolution_key")?,
        charge: text(row, "charge")?,
        resolution,
    })
}

/// Which records a list wants.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ParkedFilter {
    #[default]
    All,
    /// Open and charging.
    Open,
    Resolved,
}

impl StateStore {
    /// Parks a region's record with every part needed to charge it later.
    pub async fn park_usage_record(
        &self,
        region: &RegionId,
        record: &tollgate_region::UsageRecord,
        reason: &str,
        description: &str,
        now: Timestamp,
    ) -> Result<()> {
        self.park_usage_legacy(
            region,
            &record.id.0,
            &record.account,
            reason,
            description,
            now,
        )
        .await?;
        let new = NewParked::from_record(region, record, reason, description);
        insert(&self.pool, &new, now.millis()).await
    }

    /// Writes a parked record into `authority_parked` from its description (see
    /// [`NewParked::from_description`]).
    pub(super) async fn park_described(
        &self,
        region: &RegionId,
        usage_id: &str,
        account: &AccountId,
        reason: &str,
        description: &str,
        now: Timestamp,
    ) -> Result<()> {
        let new = NewParked::from_description(
            region.as_str(),
            usage_id,
            account.as_str(),
            reason,
            description,
        );
        insert(&self.pool, &new, now.millis()).await
    }

    /// One parked record by id.
    pub async fn parked(&self, id: i64) -> Result<Option<ParkedRow>> {
        let row = sqlx::query(&format!("{SELECT} WHERE parked_id = $1"))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(row_of).transpose()
    }

    /// Parked records after id `after`, oldest first, of one account (`""`: all), at most
    /// `limit` (capped at [`PARKED_PAGE_MAX`]).
    pub async fn parked_after(
        &self,
        after: i64,
        account: &str,
        filter: ParkedFilter,
        limit: u32,
    ) -> Result<Vec<ParkedRow>> {
        let state = match filter {
            ParkedFilter::All => "",
            ParkedFilter::Open => " AND state <> 'resolved'",
            ParkedFilter::Resolved => " AND state = 'resolved'",
        };
        let rows = sqlx::query(&format!(
            "{SELECT} WHERE parked_id > $1 AND ($2 = '' OR account_id = $2){state} \
             ORDER BY parked_id LIMIT $3"
        ))
        .bind(after)
        .bind(account)
        .bind(count(limit.min(PARKED_PAGE_MAX)))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(row_of).collect()
    }

    /// Open records (charging included): how many, and the micro-credits they served.
    pub async fn parked_open_totals(&self) -> Result<(i64, i64)> {
        let row = sqlx::query(
            "SELECT COUNT(*) AS n, CAST(COALESCE(SUM(cost_micros), 0) AS BIGINT) AS micros FROM authority_parked \
             WHERE state <> 'resolved'",
        )
        .fetch_one(&self.pool)
        .await?;
        Ok((int(&row, "n")?, int(&row, "micros")?))
    }

    /// Claims an open record for a CHARGE under `key` with its planned debit, or updates the
    /// plan of a CHARGE already in flight under the same key. False: someone else holds it,
    /// or it is resolved.
    pub async fn claim_parked_charge(&self, id: i64, key: &str, charge: &str) -> Result<bool> {
        let done = sqlx::query(
            "UPDATE authority_parked SET state = 'charging', resolution_key = $2, charge = $3 \
             WHERE parked_id = $1 AND (state = 'open' OR (state = 'charging' \
             AND resolution_key = $2))",
        )
        .bind(id)
        .bind(key)
        .bind(charge)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Gives a claimed record back (its CHARGE was refused and moved nothing).
    pub async fn release_parked_charge(&self, id: i64, key: &str) -> Result<()> {
        sqlx::query(
            "UPDATE authority_parked SET state = 'open', resolution_key = '', charge = '' \
             WHERE parked_id = $1 AND state = 'charging' AND resolution_key = $2",
        )
        .bind(id)
        .bind(key)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Resolves an open record, or one this key is charging. False: it is resolved already
    /// or another key holds it.
    pub async fn resolve_parked(
        &self,
        id: i64,
        key: &str,
        resolution: &ParkedResolution,
    ) -> Result<bool> {
        let done = sqlx::query(
            "UPDATE authority_parked SET state = 'resolved', resolution_key = $2, \
             resolution = $3, resolved_by = $4, resolution_reason = $5, resolved_ms = $6, \
             debit_id = $7, charged_micros = $8 WHERE parked_id = $1 AND (state = 'open' OR \
             (state = 'charging' AND resolution_key = $2))",
        )
        .bind(id)
        .bind(key)
        .bind(&resolution.resolution)
        .bind(&resolution.by)
        .bind(&resolution.reason)
        .bind(resolution.at.millis())
        .bind(&resolution.debit_id)
        .bind(resolution.charged.micros())
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_description_reads_back_into_its_parts() {
        let mut new = NewParked::from_description("local", "1-0", "acme", "r", "");
        let text = "Debit key=k 1 account=x account=acme feature=chat at=2026-01-02T03:04:05.678Z \
                    cost=2.5 draws=[\"g1=2\", \"g2=0.5\"] overdraft=0";
        parse_description(text, &mut new).unwrap();
        assert_eq!(new.kind, "debit");
        assert_eq!(new.key, "k 1 account=x");
        assert_eq!(new.feature, "chat");
        assert_eq!(new.cost, Credits::parse("2.5").unwrap());
        assert_eq!(new.draws.len(), 2);
        assert_eq!(new.draws[1].amount, Credits::parse("0.5").unwrap());
        assert_eq!(
            new.at,
            Timestamp::parse_rfc3339("2026-01-02T03:04:05.678Z").unwrap()
        );
        let bad = NewParked::from_description("local", "1-0", "acme", "r", "garbage");
        assert_eq!(bad.cost, Credits::ZERO);
    }

    #[tokio::test]
    async fn rows_parked_before_the_table_existed_are_copied_in_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("state.db").display());
        let state = StateStore::connect(&url).await.unwrap();
        let description = "Capture key=c1 account=acme feature=chat at=2026-01-02T00:00:00.000Z \
                           cost=1 draws=[\"g1=1\"] overdraft=0";
        sqlx::query(
            "INSERT INTO authority_parked_usage (region, usage_id, account_id, reason, record, \
             parked_ms) VALUES ('local', '7-0', 'acme', 'grant g1 is short', $1, 5000)",
        )
        .bind(description)
        .execute(&state.pool)
        .await
        .unwrap();
        assert!(state
            .parked_after(0, "", ParkedFilter::All, 10)
            .await
            .unwrap()
            .is_empty());
        drop(state);
        let state = StateStore::connect(&url).await.unwrap();
        let rows = state
            .parked_after(0, "acme", ParkedFilter::Open, 10)
            .await
            .unwrap();
        assert_eq!(rows.len(), 1);
        let row = &rows[0];
        assert_eq!(row.state, ParkedState::Open);
        assert_eq!(row.parked.kind, "capture");
        assert_eq!(row.parked.key, "c1");
        assert_eq!(row.parked.reason, "grant g1 is short");
        assert_eq!(row.parked_at.millis(), 5000);
        assert_eq!(state.parked_open_totals().await.unwrap(), (1, 1_000_000));
        // Copied once: a second start adds nothing.
        drop(state);
        let state = StateStore::connect(&url).await.unwrap();
        assert_eq!(state.parked_open_totals().await.unwrap(), (1, 1_000_000));
    }
}
