// The SQL store, written once for both backends.
//
// This file is `include!`d by `postgres.rs` and `sqlite.rs`, each of which first defines
// `type Db` (the sqlx database), `fn sql(template) -> String` (the dialect rewrite),
// `begin_write` and `begin_read`. Writing it once keeps the two stores' behaviour identical
// while every sqlx call stays on a concrete database type (sqlx code generic over the database
// needs higher-ranked bounds that async code handles poorly).
//
// SQL templates use `tg_credits(micros)` / `tg_micros(amount)` for money and `tg_time(ms)` /
// `tg_ms(time)` for instants, and `{lock}` after a row lock query. On PostgreSQL these are
// SQL functions from the migration (NUMERIC(38,6) and timestamptz columns) and `FOR UPDATE`;
// on SQLite, whose columns already hold integer micro-credits and milliseconds, they vanish.

use std::collections::BTreeMap;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use sqlx::Row as _;
use tollgate_core::command::{
    Adjust, CloseGrant, CloseKind, ClosePeriod, CreateAccount, IssueGrant, Metadata, Refund,
    SettleDebt, UpdateAccount, UsageDebit,
};
use tollgate_core::{
    AccountBook, AccountId, BookError, BurnPlan, Credits, DebitId, DebitRecord, Draw, EntryKind,
    Grant, GrantId, GrantSource, GrantState, PriceRule, Quantity, Rate, RefundGrantTerms, Scope,
    Timestamp, Totals,
};

use crate::apply::{self, Context};
use crate::chain::GENESIS_HASH;
use crate::error::{classify, LedgerError, Refusal, RefusalCode};
use crate::model::{
    AccountSnapshot, DebitQuery, DebitRow, Entry, EntryFilter, GrantMap, GrantRecord, Outcome,
    Page, PageRequest, Receipt, UsageOutcome, VerifyReport, FILTER_KINDS_MAX, OPEN_GRANTS_MAX,
    UNIT_BYTES_MAX, USAGE_BATCH_MAX, VERIFY_PAGE_ENTRIES,
};
use crate::store::LedgerStore;
use crate::verify::ChainCheck;

type DbRow = <Db as sqlx::Database>::Row;
type Tx = sqlx::Transaction<'static, Db>;

/// A write transaction, holding the in-process writer lock where the backend has one.
struct WriteTx {
    tx: Tx,
    _writer: Option<tokio::sync::OwnedMutexGuard<()>>,
}

const ACCOUNT_COLUMNS: &str = "account_id, tg_micros(overdraft_limit) AS overdraft_limit, \
    tg_micros(debt) AS debt, tg_micros(balance) AS balance, tg_micros(granted) AS granted, \
    tg_micros(debited) AS debited, tg_micros(refunded) AS refunded, \
    tg_micros(expired) AS expired, tg_micros(voided) AS voided, \
    tg_micros(adjusted) AS adjusted, entry_count, last_hash, metadata, \
    tg_ms(created_at) AS created_at, tg_ms(updated_at) AS updated_at";

const GRANT_COLUMNS: &str = "account_id, grant_id, tg_micros(amount) AS amount, \
    tg_micros(remaining) AS remaining, priority, tg_ms(effective_at) AS effective_at, \
    tg_ms(expires_at) AS expires_at, scope, source, state, cost_basis, external_ref, \
    metadata, tg_ms(created_at) AS created_at";

const ENTRY_COLUMNS: &str = "account_id, seq, kind, tg_micros(amount) AS amount, grant_id, \
    debit_id, operation, feature, actor, region, price_version, price_rule, quantity, unit, rate, \
    memo, tg_ms(event_at) AS event_at, tg_ms(recorded_at) AS recorded_at, prev_hash, hash";

/// A debit's draws as stored (JSON on the debit row): amounts and refunds in micro-credits.
#[derive(Serialize, Deserialize)]
struct StoredDraw {
    grant_id: GrantId,
    amount: i64,
    refunded: i64,
}

/// What a mutation's rule produced, before it is written.
struct Done {
    movements: Vec<tollgate_core::Movement>,
    context: Context,
    grant_id: Option<GrantId>,
    grant_metadata: Metadata,
}

type RunResult = Result<Result<Done, Refusal>, LedgerError>;

/// What a mutation reads of the account besides its row: the grants it names, the debit it
/// refunds (and that debit's grants), and only when its rule looks across the account (a
/// negative adjustment) every open grant that holds credits. The rest of a long history is
/// never read, so a mutation's work does not grow with it.
#[derive(Default)]
struct Load {
    grants: Vec<GrantId>,
    debit: Option<DebitId>,
    with_credits: bool,
}

fn corrupt_column(column: &str, error: impl std::fmt::Display) -> LedgerError {
    LedgerError::corrupt(format!("column {column}: {error}"))
}

fn get_i64(row: &DbRow, column: &str) -> Result<i64, LedgerError> {
    row.try_get::<i64, _>(column).map_err(LedgerError::from)
}

fn get_text(row: &DbRow, column: &str) -> Result<String, LedgerError> {
    row.try_get::<String, _>(column).map_err(LedgerError::from)
}

fn get_opt_text(row: &DbRow, column: &str) -> Result<Option<String>, LedgerError> {
    row.try_get::<Option<String>, _>(column)
        .map_err(LedgerError::from)
}

/// What a usage debit was priced with: quantity, unit, rate (each `None` when not kept).
type Pricing = (Option<Quantity>, Option<String>, Option<Rate>);

/// What a debit was priced with, read from the nullable `quantity`, `unit` and `rate` columns.
fn get_pricing(row: &DbRow) -> Result<Pricing, LedgerError> {
    let quantity = get_opt_text(row, "quantity")?
        .map(|q| Quantity::parse(&q).map_err(|e| corrupt_column("quantity", e)))
        .transpose()?;
    let rate = get_opt_text(row, "rate")?
        .map(|r| Rate::parse(&r).map_err(|e| corrupt_column("rate", e)))
        .transpose()?;
    Ok((quantity, get_opt_text(row, "unit")?, rate))
}

fn get_credits(row: &DbRow, column: &str) -> Result<Credits, LedgerError> {
    get_i64(row, column).map(Credits::from_micros)
}

fn get_time(row: &DbRow, column: &str) -> Result<Timestamp, LedgerError> {
    apply::timestamp(column, get_i64(row, column)?)
}

fn parse_id<T>(column: &str, text: String) -> Result<T, LedgerError>
where
    T: TryFrom<String, Error = tollgate_core::IdError>,
{
    T::try_from(text).map_err(|e| corrupt_column(column, e))
}

/// Open grants holding credits in burn-down order (`tollgate_core::burn_order`: priority,
/// expiry with none last, effective time, id byte-wise).
fn with_credits_query() -> String {
    sql(&format!(
        "SELECT {GRANT_COLUMNS} FROM grants WHERE account_id = $1 AND state = 'open' \
         AND remaining > 0 \
         ORDER BY priority, expires_at IS NULL, expires_at, effective_at, grant_id{{bytes}} \
         LIMIT $2"
    ))
}

/// What [`with_credits_query`] asks for to return at most `limit` grants and still tell
/// whether there are more.
fn with_credits_rows(limit: usize) -> i64 {
    i64::try_from(limit.min(OPEN_GRANTS_MAX).saturating_add(1)).unwrap_or(i64::MAX)
}

/// The rows of [`with_credits_query`], at most `limit` of them; more than
/// [`OPEN_GRANTS_MAX`] is refused.
fn grants_with_credits_of(
    account: &AccountId,
    rows: &[DbRow],
    limit: usize,
) -> Result<Vec<GrantRecord>, LedgerError> {
    let limit = limit.min(OPEN_GRANTS_MAX);
    if rows.len() > OPEN_GRANTS_MAX {
        return Err(LedgerError::corrupt(format!(
            "account {account} has more than {OPEN_GRANTS_MAX} open grants with credits"
        )));
    }
    rows.iter().take(limit).map(grant_record_of).collect()
}

fn parse_opt_id<T>(row: &DbRow, column: &str) -> Result<Option<T>, LedgerError>
where
    T: TryFrom<String, Error = tollgate_core::IdError>,
{
    get_opt_text(row, column)?
        .map(|text| parse_id(column, text))
        .transpose()
}

fn metadata_json(metadata: &Metadata) -> Result<String, LedgerError> {
    serde_json::to_string(metadata.entries()).map_err(LedgerError::corrupt)
}

fn parse_metadata(text: &str) -> Result<Metadata, LedgerError> {
    let entries: BTreeMap<String, String> =
        serde_json::from_str(text).map_err(|e| corrupt_column("metadata", e))?;
    Metadata::new(entries).map_err(|e| corrupt_column("metadata", e))
}

fn snapshot_of(row: &DbRow) -> Result<AccountSnapshot, LedgerError> {
    Ok(AccountSnapshot {
        account: parse_id("account_id", get_text(row, "account_id")?)?,
        overdraft_limit: get_credits(row, "overdraft_limit")?,
        debt: get_credits(row, "debt")?,
        balance: get_credits(row, "balance")?,
        totals: Totals {
            granted: get_credits(row, "granted")?,
            debited: get_credits(row, "debited")?,
            refunded: get_credits(row, "refunded")?,
            expired: get_credits(row, "expired")?,
            voided: get_credits(row, "voided")?,
            adjusted: get_credits(row, "adjusted")?,
        },
        entry_count: apply::u64_of("entry_count", get_i64(row, "entry_count")?)?,
        last_hash: get_text(row, "last_hash")?,
        metadata: parse_metadata(&get_text(row, "metadata")?)?,
        created_at: get_time(row, "created_at")?,
        updated_at: get_time(row, "updated_at")?,
    })
}

fn grant_record_of(row: &DbRow) -> Result<GrantRecord, LedgerError> {
    let source = get_text(row, "source")?;
    let state = get_text(row, "state")?;
    let scope: Scope = serde_json::from_str(&get_text(row, "scope")?)
        .map_err(|e| corrupt_column("scope", e))?;
    let cost_basis = get_opt_text(row, "cost_basis")?
        .map(|text| serde_json::from_str(&text).map_err(|e| corrupt_column("cost_basis", e)))
        .transpose()?;
    let priority = u32::try_from(get_i64(row, "priority")?)
        .map_err(|e| corrupt_column("priority", e))?;
    let expires_at = row
        .try_get::<Option<i64>, _>("expires_at")?
        .map(|ms| apply::timestamp("expires_at", ms))
        .transpose()?;
    let grant = Grant {
        id: parse_id("grant_id", get_text(row, "grant_id")?)?,
        amount: get_credits(row, "amount")?,
        remaining: get_credits(row, "remaining")?,
        priority,
        effective_at: get_time(row, "effective_at")?,
        expires_at,
        scope,
        source: GrantSource::parse(&source).ok_or_else(|| corrupt_column("source", &source))?,
        cost_basis,
        external_ref: get_opt_text(row, "external_ref")?,
        state: GrantState::parse(&state).ok_or_else(|| corrupt_column("state", &state))?,
    };
    Ok(GrantRecord {
        account: parse_id("account_id", get_text(row, "account_id")?)?,
        grant,
        metadata: parse_metadata(&get_text(row, "metadata")?)?,
        created_at: get_time(row, "created_at")?,
    })
}

fn entry_of(row: &DbRow) -> Result<Entry, LedgerError> {
    let kind = get_text(row, "kind")?;
    let price_version = row
        .try_get::<Option<i64>, _>("price_version")?
        .map(|v| apply::u64_of("price_version", v))
        .transpose()?;
    let price_rule = get_opt_text(row, "price_rule")?
        .map(|rule| PriceRule::parse(&rule).ok_or_else(|| corrupt_column("price_rule", rule)))
        .transpose()?;
    let (quantity, unit, rate) = get_pricing(row)?;
    Ok(Entry {
        account: parse_id("account_id", get_text(row, "account_id")?)?,
        seq: apply::u64_of("seq", get_i64(row, "seq")?)?,
        kind: EntryKind::parse(&kind).ok_or_else(|| corrupt_column("kind", &kind))?,
        amount: get_credits(row, "amount")?,
        grant_id: parse_opt_id(row, "grant_id")?,
        debit_id: parse_opt_id(row, "debit_id")?,
        operation: get_text(row, "operation")?,
        feature: parse_opt_id(row, "feature")?,
        actor: parse_opt_id(row, "actor")?,
        region: parse_opt_id(row, "region")?,
        price_version,
        price_rule,
        quantity,
        unit,
        rate,
        memo: get_text(row, "memo")?,
        event_at: get_time(row, "event_at")?,
        recorded_at: get_time(row, "recorded_at")?,
        prev_hash: get_text(row, "prev_hash")?,
        hash: get_text(row, "hash")?,
    })
}

fn debit_record_of(row: &DbRow) -> Result<DebitRecord, LedgerError> {
    let stored: Vec<StoredDraw> = serde_json::from_str(&get_text(row, "draws")?)
        .map_err(|e| corrupt_column("draws", e))?;
    let mut plan = BurnPlan {
        draws: Vec::with_capacity(stored.len()),
        overdraft: get_credits(row, "overdraft")?,
    };
    let mut refunded_draws = Vec::with_capacity(stored.len());
    for draw in stored {
        plan.draws.push(Draw {
            grant_id: draw.grant_id,
            amount: Credits::from_micros(draw.amount),
        });
        refunded_draws.push(Credits::from_micros(draw.refunded));
    }
    Ok(DebitRecord {
        at: get_time(row, "event_at")?,
        plan,
        refunded_draws,
        refunded_overdraft: get_credits(row, "refunded_overdraft")?,
    })
}

fn draws_json(record: &DebitRecord) -> Result<String, LedgerError> {
    let stored: Vec<StoredDraw> = record
        .plan
        .draws
        .iter()
        .zip(&record.refunded_draws)
        .map(|(draw, refunded)| StoredDraw {
            grant_id: draw.grant_id.clone(),
            amount: draw.amount.micros(),
            refunded: refunded.micros(),
        })
        .collect();
    serde_json::to_string(&stored).map_err(LedgerError::corrupt)
}

fn price_version_i64(version: Option<u64>) -> Result<Option<i64>, LedgerError> {
    version
        .map(|v| apply::i64_of("price_version", v))
        .transpose()
}

impl Store {
    async fn lock_account(
        w: &mut WriteTx,
        account: &AccountId,
    ) -> Result<Option<AccountSnapshot>, LedgerError> {
        let text = sql(&format!(
            "SELECT {ACCOUNT_COLUMNS} FROM accounts WHERE account_id = $1 {{lock}}"
        ));
        let row = sqlx::query(&text)
            .bind(account.as_str())
            .fetch_optional(&mut *w.tx)
            .await?;
        row.as_ref().map(snapshot_of).transpose()
    }

    async fn insert_account(w: &mut WriteTx, a: &AccountSnapshot) -> Result<bool, LedgerError> {
        let text = sql(
            "INSERT INTO accounts (account_id, overdraft_limit, debt, balance, granted, debited, \
             refunded, expired, voided, adjusted, entry_count, last_hash, metadata, created_at, \
             updated_at) VALUES ($1, tg_credits($2), tg_credits($3), tg_credits($4), \
             tg_credits($5), tg_credits($6), tg_credits($7), tg_credits($8), tg_credits($9), \
             tg_credits($10), $11, $12, $13, tg_time($14), tg_time($15)) \
             ON CONFLICT (account_id) DO NOTHING",
        );
        let done = sqlx::query(&text)
            .bind(a.account.as_str())
            .bind(a.overdraft_limit.micros())
            .bind(a.debt.micros())
            .bind(a.balance.micros())
            .bind(a.totals.granted.micros())
            .bind(a.totals.debited.micros())
            .bind(a.totals.refunded.micros())
            .bind(a.totals.expired.micros())
            .bind(a.totals.voided.micros())
            .bind(a.totals.adjusted.micros())
            .bind(apply::i64_of("entry_count", a.entry_count)?)
            .bind(a.last_hash.as_str())
            .bind(metadata_json(&a.metadata)?)
            .bind(a.created_at.millis())
            .bind(a.updated_at.millis())
            .execute(&mut *w.tx)
            .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn update_account(w: &mut WriteTx, a: &AccountSnapshot) -> Result<(), LedgerError> {
        let text = sql(
            "UPDATE accounts SET debt = tg_credits($2), balance = tg_credits($3), \
             granted = tg_credits($4), debited = tg_credits($5), refunded = tg_credits($6), \
             expired = tg_credits($7), voided = tg_credits($8), adjusted = tg_credits($9), \
             entry_count = $10, last_hash = $11, updated_at = tg_time($12) \
             WHERE account_id = $1",
        );
        sqlx::query(&text)
            .bind(a.account.as_str())
            .bind(a.debt.micros())
            .bind(a.balance.micros())
            .bind(a.totals.granted.micros())
            .bind(a.totals.debited.micros())
            .bind(a.totals.refunded.micros())
            .bind(a.totals.expired.micros())
            .bind(a.totals.voided.micros())
            .bind(a.totals.adjusted.micros())
            .bind(apply::i64_of("entry_count", a.entry_count)?)
            .bind(a.last_hash.as_str())
            .bind(a.updated_at.millis())
            .execute(&mut *w.tx)
            .await?;
        Ok(())
    }

    /// The account's open grants that still hold credits, for a rule that looks across the
    /// account (see [`Load`]).
    async fn open_grants(w: &mut WriteTx, account: &AccountId) -> Result<GrantMap, LedgerError> {
        let rows = sqlx::query(&with_credits_query())
            .bind(account.as_str())
            .bind(with_credits_rows(OPEN_GRANTS_MAX))
            .fetch_all(&mut *w.tx)
            .await?;
        grants_with_credits_of(account, &rows, OPEN_GRANTS_MAX)?
            .into_iter()
            .map(|record| Ok((record.grant.id.clone(), record.grant)))
            .collect()
    }

    async fn grant_in_tx(
        w: &mut WriteTx,
        account: &AccountId,
        grant: &GrantId,
    ) -> Result<Option<Grant>, LedgerError> {
        let text = sql(&format!(
            "SELECT {GRANT_COLUMNS} FROM grants WHERE account_id = $1 AND grant_id = $2"
        ));
        let row = sqlx::query(&text)
            .bind(account.as_str())
            .bind(grant.as_str())
            .fetch_optional(&mut *w.tx)
            .await?;
        row.as_ref()
            .map(|row| grant_record_of(row).map(|r| r.grant))
            .transpose()
    }

    /// A refusal when a grant the rule created has the id of one that was not loaded (a
    /// generated refund or adjustment id a caller had already used): the book could not see it.
    async fn taken_grant_id(
        w: &mut WriteTx,
        account: &AccountId,
        loaded: &GrantMap,
        book: &AccountBook,
    ) -> Result<Option<Refusal>, LedgerError> {
        for grant in book.grants().filter(|g| !loaded.contains_key(&g.id)) {
            if Self::grant_in_tx(w, account, &grant.id).await?.is_some() {
                return Ok(Some(Refusal::with_message(
                    RefusalCode::DuplicateGrant,
                    format!("account {account} already has a grant {}", grant.id),
                )));
            }
        }
        Ok(None)
    }

    /// Adds the named grants that are not loaded yet.
    async fn load_grants(
        w: &mut WriteTx,
        account: &AccountId,
        names: Vec<GrantId>,
        loaded: &mut GrantMap,
    ) -> Result<(), LedgerError> {
        for id in names {
            if loaded.contains_key(&id) {
                continue;
            }
            if let Some(found) = Self::grant_in_tx(w, account, &id).await? {
                loaded.insert(id, found);
            }
        }
        Ok(())
    }

    async fn insert_grant(
        w: &mut WriteTx,
        account: &AccountId,
        grant: &Grant,
        metadata: &Metadata,
        now: Timestamp,
    ) -> Result<(), LedgerError> {
        let text = sql(
            "INSERT INTO grants (account_id, grant_id, amount, remaining, priority, \
             effective_at, expires_at, scope, source, state, cost_basis, external_ref, \
             metadata, created_at) VALUES ($1, $2, tg_credits($3), tg_credits($4), $5, \
             tg_time($6), tg_time($7), $8, $9, $10, $11, $12, $13, tg_time($14))",
        );
        let scope = serde_json::to_string(&grant.scope).map_err(LedgerError::corrupt)?;
        let cost_basis = grant
            .cost_basis
            .map(|money| serde_json::to_string(&money))
            .transpose()
            .map_err(LedgerError::corrupt)?;
        sqlx::query(&text)
            .bind(account.as_str())
            .bind(grant.id.as_str())
            .bind(grant.amount.micros())
            .bind(grant.remaining.micros())
            .bind(i64::from(grant.priority))
            .bind(grant.effective_at.millis())
            .bind(grant.expires_at.map(Timestamp::millis))
            .bind(scope)
            .bind(grant.source.as_str())
            .bind(grant.state.as_str())
            .bind(cost_basis)
            .bind(grant.external_ref.as_deref())
            .bind(metadata_json(metadata)?)
            .bind(now.millis())
            .execute(&mut *w.tx)
            .await?;
        Ok(())
    }

    async fn update_grant(
        w: &mut WriteTx,
        account: &AccountId,
        grant: &Grant,
    ) -> Result<(), LedgerError> {
        let text = sql(
            "UPDATE grants SET remaining = tg_credits($3), state = $4 \
             WHERE account_id = $1 AND grant_id = $2",
        );
        sqlx::query(&text)
            .bind(account.as_str())
            .bind(grant.id.as_str())
            .bind(grant.remaining.micros())
            .bind(grant.state.as_str())
            .execute(&mut *w.tx)
            .await?;
        Ok(())
    }

    async fn debit_in_tx(
        w: &mut WriteTx,
        account: &AccountId,
        debit: &DebitId,
    ) -> Result<Option<DebitRecord>, LedgerError> {
        let text = sql(
            "SELECT tg_ms(event_at) AS event_at, tg_micros(overdraft) AS overdraft, \
             tg_micros(refunded_overdraft) AS refunded_overdraft, draws \
             FROM debits WHERE account_id = $1 AND debit_id = $2",
        );
        let row = sqlx::query(&text)
            .bind(account.as_str())
            .bind(debit.as_str())
            .fetch_optional(&mut *w.tx)
            .await?;
        row.as_ref().map(debit_record_of).transpose()
    }

    async fn insert_debit(
        w: &mut WriteTx,
        debit: &UsageDebit,
        record: &DebitRecord,
        now: Timestamp,
    ) -> Result<(), LedgerError> {
        let text = sql(
            "INSERT INTO debits (account_id, debit_id, feature, event_at, amount, overdraft, \
             refunded_overdraft, draws, price_version, price_rule, actor, region, \
             idempotency_key, recorded_at, quantity, unit, rate) VALUES ($1, $2, $3, \
             tg_time($4), tg_credits($5), tg_credits($6), tg_credits($7), $8, $9, $10, $11, $12, \
             $13, tg_time($14), $15, $16, $17)",
        );
        let context = usage_context(debit);
        sqlx::query(&text)
            .bind(debit.account.as_str())
            .bind(debit.debit_id.as_str())
            .bind(debit.feature.as_str())
            .bind(debit.at.millis())
            .bind(record.amount().micros())
            .bind(record.plan.overdraft.micros())
            .bind(record.refunded_overdraft.micros())
            .bind(draws_json(record)?)
            .bind(price_version_i64(Some(debit.price_version))?)
            .bind(debit.price_rule.as_str())
            .bind(debit.actor.as_ref().map(|a| a.as_str()))
            .bind(debit.region.as_ref().map(|r| r.as_str()))
            .bind(debit.idempotency_key.as_ref().map(|k| k.as_str()))
            .bind(now.millis())
            .bind(context.quantity.map(|q| q.to_string()))
            .bind(context.unit)
            .bind(context.rate.map(|r| r.to_string()))
            .execute(&mut *w.tx)
            .await?;
        Ok(())
    }

    async fn update_debit(
        w: &mut WriteTx,
        account: &AccountId,
        debit: &DebitId,
        record: &DebitRecord,
    ) -> Result<(), LedgerError> {
        let text = sql(
            "UPDATE debits SET refunded_overdraft = tg_credits($3), draws = $4 \
             WHERE account_id = $1 AND debit_id = $2",
        );
        sqlx::query(&text)
            .bind(account.as_str())
            .bind(debit.as_str())
            .bind(record.refunded_overdraft.micros())
            .bind(draws_json(record)?)
            .execute(&mut *w.tx)
            .await?;
        Ok(())
    }

    async fn insert_entry(w: &mut WriteTx, e: &Entry) -> Result<(), LedgerError> {
        let text = sql(
            "INSERT INTO ledger_entries (account_id, seq, kind, amount, grant_id, debit_id, \
             operation, feature, actor, region, price_version, price_rule, memo, event_at, \
             recorded_at, prev_hash, hash, quantity, unit, rate) VALUES ($1, $2, $3, \
             tg_credits($4), $5, $6, $7, $8, $9, $10, $11, $12, $13, tg_time($14), tg_time($15), \
             $16, $17, $18, $19, $20)",
        );
        sqlx::query(&text)
            .bind(e.account.as_str())
            .bind(apply::i64_of("seq", e.seq)?)
            .bind(e.kind.as_str())
            .bind(e.amount.micros())
            .bind(e.grant_id.as_ref().map(|g| g.as_str()))
            .bind(e.debit_id.as_ref().map(|d| d.as_str()))
            .bind(e.operation.as_str())
            .bind(e.feature.as_ref().map(|f| f.as_str()))
            .bind(e.actor.as_ref().map(|a| a.as_str()))
            .bind(e.region.as_ref().map(|r| r.as_str()))
            .bind(price_version_i64(e.price_version)?)
            .bind(e.price_rule.map(PriceRule::as_str))
            .bind(e.memo.as_str())
            .bind(e.event_at.millis())
            .bind(e.recorded_at.millis())
            .bind(e.prev_hash.as_str())
            .bind(e.hash.as_str())
            .bind(e.quantity.map(|q| q.to_string()))
            .bind(e.unit.as_deref())
            .bind(e.rate.map(|r| r.to_string()))
            .execute(&mut *w.tx)
            .await?;
        Ok(())
    }

    /// The stored result for `key`: a replay if the request is the same, a conflict if not.
    async fn remembered<T: serde::de::DeserializeOwned>(
        w: &mut WriteTx,
        key: &str,
        operation: &str,
        fingerprint: &str,
    ) -> Result<Option<T>, LedgerError> {
        let text = sql(
            "SELECT operation, account_id, fingerprint, result FROM idempotency \
             WHERE idempotency_key = $1",
        );
        let Some(row) = sqlx::query(&text)
            .bind(key)
            .fetch_optional(&mut *w.tx)
            .await?
        else {
            return Ok(None);
        };
        let stored_operation = get_text(&row, "operation")?;
        if stored_operation != operation || get_text(&row, "fingerprint")? != fingerprint {
            return Err(LedgerError::IdempotencyConflict {
                key: key.to_owned(),
                operation: stored_operation,
                account: get_text(&row, "account_id")?,
            });
        }
        let result = serde_json::from_str(&get_text(&row, "result")?)
            .map_err(|e| corrupt_column("result", e))?;
        Ok(Some(result))
    }

    async fn remember<T: Serialize>(
        w: &mut WriteTx,
        key: &str,
        operation: &str,
        account: &AccountId,
        fingerprint: &str,
        result: &T,
        now: Timestamp,
    ) -> Result<(), LedgerError> {
        let text = sql(
            "INSERT INTO idempotency (idempotency_key, operation, account_id, fingerprint, \
             result, created_at) VALUES ($1, $2, $3, $4, $5, tg_time($6)) \
             ON CONFLICT (idempotency_key) DO NOTHING",
        );
        let json = serde_json::to_string(result).map_err(LedgerError::corrupt)?;
        let done = sqlx::query(&text)
            .bind(key)
            .bind(operation)
            .bind(account.as_str())
            .bind(fingerprint)
            .bind(json)
            .bind(now.millis())
            .execute(&mut *w.tx)
            .await?;
        if done.rows_affected() == 1 {
            Ok(())
        } else {
            // Another account's transaction took the key meanwhile; this one rolls back.
            Err(LedgerError::IdempotencyConflict {
                key: key.to_owned(),
                operation: operation.to_owned(),
                account: "another account".to_owned(),
            })
        }
    }

    /// Writes what `changes` computed, inserting new grants with `metadata` for `labelled`.
    async fn write_changes(
        w: &mut WriteTx,
        changes: &apply::Changes,
        labelled: Option<(&GrantId, &Metadata)>,
        now: Timestamp,
    ) -> Result<(), LedgerError> {
        let account = &changes.account.account;
        let empty = Metadata::default();
        for grant in &changes.new_grants {
            let metadata = match labelled {
                Some((id, metadata)) if *id == grant.id => metadata,
                _ => &empty,
            };
            Self::insert_grant(w, account, grant, metadata, now).await?;
        }
        for grant in &changes.changed_grants {
            Self::update_grant(w, account, grant).await?;
        }
        for entry in &changes.entries {
            Self::insert_entry(w, entry).await?;
        }
        Self::update_account(w, &changes.account).await
    }

    /// One admin mutation on one account: lock, replay or run the rule, write, remember.
    #[allow(clippy::too_many_arguments)]
    async fn mutate(
        &self,
        key: &str,
        account: &AccountId,
        operation: &'static str,
        fingerprint: String,
        now: Timestamp,
        load: Load,
        run: impl FnOnce(&mut AccountBook, &AccountSnapshot) -> RunResult + Send,
    ) -> Result<Outcome, LedgerError> {
        let mut w = self.begin_write().await?;
        let snapshot = Self::lock_account(&mut w, account)
            .await?
            .ok_or_else(|| LedgerError::UnknownAccount(account.clone()))?;
        if let Some(outcome) =
            Self::remembered::<Outcome>(&mut w, key, operation, &fingerprint).await?
        {
            return Ok(outcome.map(|receipt| Receipt {
                replayed: true,
                ..receipt
            }));
        }
        let mut loaded = if load.with_credits {
            Self::open_grants(&mut w, account).await?
        } else {
            GrantMap::new()
        };
        Self::load_grants(&mut w, account, load.grants, &mut loaded).await?;
        let mut debits = Vec::new();
        if let Some(debit) = &load.debit {
            let record = Self::debit_in_tx(&mut w, account, debit)
                .await?
                .ok_or_else(|| LedgerError::UnknownDebit {
                    account: account.clone(),
                    debit: debit.clone(),
                })?;
            let named = record.plan.draws.iter().map(|d| d.grant_id.clone()).collect();
            Self::load_grants(&mut w, account, named, &mut loaded).await?;
            debits.push((debit.clone(), record));
        }
        let mut book = AccountBook::from_parts(
            snapshot.overdraft_limit,
            snapshot.debt,
            snapshot.totals,
            loaded.values().cloned(),
            debits,
        )
        .map_err(|e| LedgerError::corrupt(format!("account {account}: {e}")))?;
        let mut outcome = run(&mut book, &snapshot)?;
        if outcome.is_ok() {
            if let Some(refusal) = Self::taken_grant_id(&mut w, account, &loaded, &book).await? {
                outcome = Err(refusal);
            }
        }
        let outcome = match outcome {
            Err(refusal) => Err(refusal),
            Ok(done) => {
                let groups = [(done.movements.clone(), done.context)];
                let changes = apply::changes(&snapshot, &loaded, &book, &groups, now)?;
                let labelled = done.grant_id.as_ref().map(|id| (id, &done.grant_metadata));
                Self::write_changes(&mut w, &changes, labelled, now).await?;
                if let Some(debit) = &load.debit {
                    if let Some(record) = book.debit_record(debit) {
                        Self::update_debit(&mut w, account, debit, record).await?;
                    }
                }
                let (first_seq, last_seq) = changes.ranges.first().copied().unwrap_or((0, 0));
                Ok(Receipt {
                    account: account.clone(),
                    operation: format!("key:{key}"),
                    movements: done.movements,
                    first_seq,
                    last_seq,
                    balance: changes.account.balance,
                    grant_id: done.grant_id,
                    recorded_at: now,
                    replayed: false,
                })
            }
        };
        Self::remember(&mut w, key, operation, account, &fingerprint, &outcome, now).await?;
        w.tx.commit().await?;
        Ok(outcome)
    }

    /// Applies one account's part of a usage batch inside the batch's transaction.
    async fn apply_account_usage(
        w: &mut WriteTx,
        account: &AccountId,
        debits: &[&UsageDebit],
        now: Timestamp,
    ) -> Result<Vec<UsageOutcome>, LedgerError> {
        let Some(snapshot) = Self::lock_account(w, account).await? else {
            let refusal = Refusal::with_message(
                RefusalCode::UnknownAccount,
                format!("account {account} does not exist"),
            );
            return Ok(debits
                .iter()
                .map(|d| UsageOutcome::Refused {
                    debit_id: d.debit_id.clone(),
                    refusal: refusal.clone(),
                })
                .collect());
        };
        let mut loaded = GrantMap::new();
        let named = debits
            .iter()
            .flat_map(|debit| debit.plan.draws.iter().map(|d| d.grant_id.clone()))
            .collect();
        Self::load_grants(w, account, named, &mut loaded).await?;
        let mut book = AccountBook::from_parts(
            snapshot.overdraft_limit,
            snapshot.debt,
            snapshot.totals,
            loaded.values().cloned(),
            [],
        )
        .map_err(|e| LedgerError::corrupt(format!("account {account}: {e}")))?;
        let mut outcomes = Vec::with_capacity(debits.len());
        let mut groups = Vec::new();
        let mut applied = Vec::new();
        for debit in debits {
            // The same decision again (same event time, same draws) is a duplicate; another
            // decision under the same id (a key reused after the region forgot it) is charged
            // under the next generation of the id, never dropped as a replay.
            let mut generation = 1;
            let debit_id = loop {
                let id = crate::model::debit_generation(&debit.debit_id, generation)?;
                let seen = match book.debit_record(&id) {
                    Some(record) => Some(record.clone()),
                    None => Self::debit_in_tx(w, account, &id).await?,
                };
                match seen {
                    None => break Some(id),
                    Some(record) if record.at == debit.at && record.plan == debit.plan => {
                        outcomes.push(UsageOutcome::Duplicate { debit_id: id });
                        break None;
                    }
                    Some(_) if generation >= crate::model::DEBIT_GENERATIONS_MAX => {
                        return Err(LedgerError::invalid(
                            "debit_id",
                            format!(
                                "{} was used for {generation} different decisions",
                                debit.debit_id
                            ),
                        ));
                    }
                    Some(_) => generation += 1,
                }
            };
            let Some(debit_id) = debit_id else {
                continue;
            };
            let debit: std::borrow::Cow<'_, UsageDebit> = if debit_id == debit.debit_id {
                std::borrow::Cow::Borrowed(*debit)
            } else {
                std::borrow::Cow::Owned(UsageDebit {
                    debit_id: debit_id.clone(),
                    ..(*debit).clone()
                })
            };
            match book.apply_debit(debit_id.clone(), debit.at, debit.plan.clone(), true) {
                Ok(movements) => {
                    groups.push((movements, usage_context(&debit)));
                    applied.push((outcomes.len(), debit));
                    outcomes.push(UsageOutcome::Applied {
                        debit_id,
                        first_seq: 0,
                        last_seq: 0,
                    });
                }
                Err(BookError::DuplicateDebit) => {
                    outcomes.push(UsageOutcome::Duplicate { debit_id });
                }
                Err(error) => {
                    let refusal = usage_refusal(account, error)?;
                    outcomes.push(UsageOutcome::Refused { debit_id, refusal });
                }
            }
        }
        if groups.is_empty() {
            return Ok(outcomes);
        }
        let changes = apply::changes(&snapshot, &loaded, &book, &groups, now)?;
        Self::write_changes(w, &changes, None, now).await?;
        for ((index, debit), range) in applied.iter().zip(&changes.ranges) {
            if let Some(record) = book.debit_record(&debit.debit_id) {
                Self::insert_debit(w, debit.as_ref(), record, now).await?;
            }
            if let Some(UsageOutcome::Applied {
                first_seq,
                last_seq,
                ..
            }) = outcomes.get_mut(*index)
            {
                (*first_seq, *last_seq) = *range;
            }
        }
        Ok(outcomes)
    }

    /// The account row outside any write transaction.
    async fn snapshot(&self, account: &AccountId) -> Result<AccountSnapshot, LedgerError> {
        let text = sql(&format!(
            "SELECT {ACCOUNT_COLUMNS} FROM accounts WHERE account_id = $1"
        ));
        let row = sqlx::query(&text)
            .bind(account.as_str())
            .fetch_optional(&self.pool)
            .await?
            .ok_or_else(|| LedgerError::UnknownAccount(account.clone()))?;
        snapshot_of(&row)
    }

    /// Verifies one account inside a read transaction, so it sees one consistent state.
    async fn verify_account(
        &self,
        account: &AccountId,
        report: &mut VerifyReport,
    ) -> Result<(), LedgerError> {
        let mut tx = self.begin_read().await?;
        let text = sql(&format!(
            "SELECT {ACCOUNT_COLUMNS} FROM accounts WHERE account_id = $1"
        ));
        let row = sqlx::query(&text)
            .bind(account.as_str())
            .fetch_optional(&mut *tx)
            .await?
            .ok_or_else(|| LedgerError::UnknownAccount(account.clone()))?;
        let snapshot = snapshot_of(&row)?;
        let mut check = ChainCheck::new(account.clone());
        let text = sql(&format!(
            "SELECT {ENTRY_COLUMNS} FROM ledger_entries WHERE account_id = $1 AND seq > $2 \
             ORDER BY seq LIMIT $3"
        ));
        let mut after: i64 = 0;
        loop {
            let rows = sqlx::query(&text)
                .bind(account.as_str())
                .bind(after)
                .bind(i64::from(VERIFY_PAGE_ENTRIES))
                .fetch_all(&mut *tx)
                .await?;
            for row in &rows {
                let seq = get_i64(row, "seq")?;
                match entry_of(row) {
                    Ok(entry) => check.feed(&entry, report),
                    Err(error) => {
                        check.unreadable(apply::u64_of("seq", seq)?, error.to_string(), report)
                    }
                }
                after = seq;
            }
            if rows.len() < VERIFY_PAGE_ENTRIES as usize {
                break;
            }
        }
        let text = sql(&format!(
            "SELECT {GRANT_COLUMNS} FROM grants WHERE account_id = $1 ORDER BY grant_id"
        ));
        let rows = sqlx::query(&text)
            .bind(account.as_str())
            .fetch_all(&mut *tx)
            .await?;
        let grants = rows
            .iter()
            .map(|row| grant_record_of(row).map(|r| r.grant))
            .collect::<Result<Vec<_>, _>>()?;
        tx.commit().await?;
        check.finish(&snapshot, &grants, report);
        Ok(())
    }
}

fn usage_context(debit: &UsageDebit) -> Context {
    Context {
        operation: format!("debit:{}", debit.debit_id),
        debit_id: Some(debit.debit_id.clone()),
        feature: Some(debit.feature.clone()),
        actor: debit.actor.clone(),
        region: debit.region.clone(),
        price_version: Some(debit.price_version),
        price_rule: Some(debit.price_rule),
        quantity: debit.quantity,
        // An empty unit names nothing: kept as absent, so it cannot make an entry that
        // records no pricing hash differently from one written before units were kept.
        unit: debit.unit.clone().filter(|unit| !unit.is_empty()),
        rate: debit.rate,
        memo: debit.hold.as_ref().map_or_else(String::new, |hold| {
            format!("{}{hold}", tollgate_core::command::CAPTURE_MEMO_PREFIX)
        }),
        event_at: Some(debit.at),
    }
}

fn usage_refusal(account: &AccountId, error: BookError) -> Result<Refusal, LedgerError> {
    match error {
        BookError::UnknownGrant(grant) => Ok(Refusal::with_message(
            RefusalCode::UnknownGrant,
            format!("grant {grant} of account {account} does not exist"),
        )),
        BookError::GrantClosed(grant) => Ok(Refusal::with_message(
            RefusalCode::DrawExceedsGrant,
            format!("grant {grant} was not active at the debit's time"),
        )),
        other => classify(account, other),
    }
}

fn admin_context(key: &str, memo: &str) -> Context {
    Context {
        operation: format!("key:{key}"),
        memo: memo.to_owned(),
        ..Context::default()
    }
}

/// Runs a rule that returns movements or a book error, sorting refusals from faults.
fn movements_or_refusal(
    account: &AccountId,
    result: Result<Vec<tollgate_core::Movement>, BookError>,
) -> Result<Result<Vec<tollgate_core::Movement>, Refusal>, LedgerError> {
    match result {
        Ok(movements) => Ok(Ok(movements)),
        Err(error) => classify(account, error).map(Err),
    }
}

/// What an admin mutation that creates no grant did: its movements under the caller's key
/// and memo, or the rule's refusal.
fn admin_done(
    account: &AccountId,
    key: &str,
    memo: &str,
    result: Result<Vec<tollgate_core::Movement>, BookError>,
) -> RunResult {
    Ok(movements_or_refusal(account, result)?.map(|movements| Done {
        movements,
        context: admin_context(key, memo),
        grant_id: None,
        grant_metadata: Metadata::default(),
    }))
}

#[async_trait]
impl LedgerStore for Store {
    async fn create_account(
        &self,
        command: CreateAccount,
        now: Timestamp,
    ) -> Result<AccountSnapshot, LedgerError> {
        const OPERATION: &str = "create_account";
        let fingerprint = apply::fingerprint(OPERATION, &command)?;
        let key = command.key.as_str();
        let mut w = self.begin_write().await?;
        if let Some(snapshot) = Self::remembered(&mut w, key, OPERATION, &fingerprint).await? {
            return Ok(snapshot);
        }
        let snapshot = AccountSnapshot {
            account: command.account.clone(),
            overdraft_limit: command.overdraft_limit,
            debt: Credits::ZERO,
            balance: Credits::ZERO,
            totals: Totals::default(),
            entry_count: 0,
            last_hash: GENESIS_HASH.to_owned(),
            metadata: command.metadata.clone(),
            created_at: now,
            updated_at: now,
        };
        if !Self::insert_account(&mut w, &snapshot).await? {
            // A concurrent request with the same key may have created it: replay that.
            if let Some(snapshot) = Self::remembered(&mut w, key, OPERATION, &fingerprint).await? {
                return Ok(snapshot);
            }
            return Err(LedgerError::AccountExists(command.account));
        }
        Self::remember(&mut w, key, OPERATION, &command.account, &fingerprint, &snapshot, now)
            .await?;
        w.tx.commit().await?;
        Ok(snapshot)
    }

    async fn update_account(
        &self,
        command: UpdateAccount,
        now: Timestamp,
    ) -> Result<AccountSnapshot, LedgerError> {
        const OPERATION: &str = "update_account";
        let fingerprint = apply::fingerprint(OPERATION, &command)?;
        let key = command.key.as_str();
        let mut w = self.begin_write().await?;
        if let Some(snapshot) = Self::remembered(&mut w, key, OPERATION, &fingerprint).await? {
            return Ok(snapshot);
        }
        let Some(mut snapshot) = Self::lock_account(&mut w, &command.account).await? else {
            return Err(LedgerError::UnknownAccount(command.account));
        };
        if let Some(limit) = command.overdraft_limit {
            snapshot.overdraft_limit = limit;
        }
        snapshot.metadata = command
            .merged_metadata(&snapshot.metadata)
            .map_err(|e| LedgerError::invalid("metadata", e))?;
        snapshot.updated_at = now;
        let text = sql(
            "UPDATE accounts SET overdraft_limit = tg_credits($2), metadata = $3, \
             updated_at = tg_time($4) WHERE account_id = $1",
        );
        sqlx::query(&text)
            .bind(snapshot.account.as_str())
            .bind(snapshot.overdraft_limit.micros())
            .bind(metadata_json(&snapshot.metadata)?)
            .bind(now.millis())
            .execute(&mut *w.tx)
            .await?;
        Self::remember(&mut w, key, OPERATION, &command.account, &fingerprint, &snapshot, now)
            .await?;
        w.tx.commit().await?;
        Ok(snapshot)
    }

    async fn prune_idempotency(&self, before: Timestamp, limit: u32) -> Result<u64, LedgerError> {
        let text = sql(
            "DELETE FROM idempotency WHERE idempotency_key IN (SELECT idempotency_key \
             FROM idempotency WHERE created_at < tg_time($1) ORDER BY created_at LIMIT $2)",
        );
        let mut w = self.begin_write().await?;
        let done = sqlx::query(&text)
            .bind(before.millis())
            .bind(i64::from(limit))
            .execute(&mut *w.tx)
            .await?;
        w.tx.commit().await?;
        Ok(done.rows_affected())
    }

    async fn account(&self, account: &AccountId) -> Result<AccountSnapshot, LedgerError> {
        self.snapshot(account).await
    }

    async fn issue_grant(
        &self,
        command: IssueGrant,
        now: Timestamp,
    ) -> Result<Outcome, LedgerError> {
        const OPERATION: &str = "issue_grant";
        let fingerprint = apply::fingerprint(OPERATION, &command)?;
        let load = Load {
            // A closed grant with the same id must be seen, or the id would be reused.
            grants: vec![command.terms.id.clone()],
            debit: None,
            with_credits: false,
        };
        let key = command.key.as_str().to_owned();
        let account = command.account.clone();
        self.mutate(&key, &account, OPERATION, fingerprint, now, load, |book, _| {
            let grant = command.terms.grant_at(now);
            let movements = match movements_or_refusal(&command.account, book.add_grant(grant, now))? {
                Ok(movements) => movements,
                Err(refusal) => return Ok(Err(refusal)),
            };
            Ok(Ok(Done {
                movements,
                context: admin_context(command.key.as_str(), command.memo.as_str()),
                grant_id: Some(command.terms.id.clone()),
                grant_metadata: command.metadata.clone(),
            }))
        })
        .await
    }

    async fn close_grant(
        &self,
        command: CloseGrant,
        now: Timestamp,
    ) -> Result<Outcome, LedgerError> {
        const OPERATION: &str = "close_grant";
        let fingerprint = apply::fingerprint(OPERATION, &command)?;
        let load = Load {
            grants: vec![command.grant.clone()],
            debit: None,
            with_credits: false,
        };
        let key = command.key.as_str().to_owned();
        let account = command.account.clone();
        self.mutate(&key, &account, OPERATION, fingerprint, now, load, |book, _| {
            let result = match command.kind {
                CloseKind::Void => book.void(&command.grant, now),
                CloseKind::Expire => book.expire(&command.grant, now),
            };
            admin_done(&command.account, command.key.as_str(), command.memo.as_str(), result)
        })
        .await
    }

    async fn refund(&self, command: Refund, now: Timestamp) -> Result<Outcome, LedgerError> {
        const OPERATION: &str = "refund";
        let fingerprint = apply::fingerprint(OPERATION, &command)?;
        let load = Load {
            grants: command.refund_grant_id.iter().cloned().collect(),
            debit: Some(command.debit.clone()),
            with_credits: false,
        };
        let key = command.key.as_str().to_owned();
        let account = command.account.clone();
        self.mutate(&key, &account, OPERATION, fingerprint, now, load, |book, snapshot| {
            let id = match &command.refund_grant_id {
                Some(id) => id.clone(),
                None => GrantId::new(format!(
                    "{}.refund.{}",
                    command.debit,
                    snapshot.entry_count.saturating_add(1)
                ))
                .map_err(|e| LedgerError::invalid("refund_grant_id", e))?,
            };
            let terms = RefundGrantTerms {
                id: id.clone(),
                expires_at: command.refund_grant_expires_at,
            };
            let result = book.refund(&command.debit, command.amount, now, terms);
            let movements = match movements_or_refusal(&command.account, result)? {
                Ok(movements) => movements,
                Err(refusal) => return Ok(Err(refusal)),
            };
            let created = book.grant(&id).is_some().then_some(id);
            let mut context = admin_context(command.key.as_str(), command.memo.as_str());
            context.debit_id = Some(command.debit.clone());
            Ok(Ok(Done {
                movements,
                context,
                grant_id: created,
                grant_metadata: Metadata::default(),
            }))
        })
        .await
    }

    async fn adjust(&self, command: Adjust, now: Timestamp) -> Result<Outcome, LedgerError> {
        const OPERATION: &str = "adjust";
        if command.amount.is_zero() {
            return Err(LedgerError::invalid("amount", "must not be zero"));
        }
        let fingerprint = apply::fingerprint(OPERATION, &command)?;
        let load = Load {
            grants: command.grant_id.iter().cloned().collect(),
            debit: None,
            // Credits taken away come from every active grant in burn-down order.
            with_credits: command.amount.is_negative(),
        };
        let key = command.key.as_str().to_owned();
        let account = command.account.clone();
        self.mutate(&key, &account, OPERATION, fingerprint, now, load, |book, snapshot| {
            let id = match &command.grant_id {
                Some(id) => id.clone(),
                None => GrantId::new(format!(
                    "adjustment.{}",
                    snapshot.entry_count.saturating_add(1)
                ))
                .map_err(|e| LedgerError::invalid("grant_id", e))?,
            };
            let debt_before = book.debt();
            let result = book.adjust_leaving(command.amount, now, id.clone(), &command.out);
            let movements = match movements_or_refusal(&command.account, result)? {
                Ok(movements) => movements,
                Err(refusal) => return Ok(Err(refusal)),
            };
            let debt = book.debt();
            if debt > debt_before && debt > book.overdraft_limit() && !command.beyond_overdraft {
                return Ok(Err(Refusal::with_message(
                    RefusalCode::OverdraftExceeded,
                    format!(
                        "the adjustment would leave account {} at balance {} (debt {}), beyond \
                         its overdraft limit {}; send it again with beyond_overdraft (and a new \
                         idempotency key) to go ahead",
                        command.account,
                        book.balance(),
                        debt,
                        book.overdraft_limit()
                    ),
                )));
            }
            let created = command.amount.is_positive().then_some(id);
            Ok(Ok(Done {
                movements,
                context: admin_context(command.key.as_str(), command.memo.as_str()),
                grant_id: created,
                grant_metadata: Metadata::default(),
            }))
        })
        .await
    }

    async fn settle_debt(
        &self,
        command: SettleDebt,
        now: Timestamp,
    ) -> Result<Outcome, LedgerError> {
        const OPERATION: &str = "settle_debt";
        if command.amount.is_negative() {
            return Err(LedgerError::invalid("amount", "must not be negative"));
        }
        let fingerprint = apply::fingerprint(OPERATION, &command)?;
        let load = Load {
            grants: vec![command.grant.clone()],
            debit: None,
            with_credits: false,
        };
        let key = command.key.as_str().to_owned();
        let account = command.account.clone();
        self.mutate(&key, &account, OPERATION, fingerprint, now, load, |book, _| {
            let result = book.settle_debt(&command.grant, command.amount, now);
            admin_done(&command.account, command.key.as_str(), command.memo.as_str(), result)
        })
        .await
    }

    async fn apply_usage(
        &self,
        batch: Vec<UsageDebit>,
        now: Timestamp,
    ) -> Result<Vec<UsageOutcome>, LedgerError> {
        if batch.len() > USAGE_BATCH_MAX {
            return Err(LedgerError::invalid(
                "batch",
                format!("{} debits, at most {USAGE_BATCH_MAX} allowed", batch.len()),
            ));
        }
        for debit in &batch {
            debit
                .validate()
                .map_err(|e| LedgerError::invalid("draws", format!("debit {}: {e}", debit.debit_id)))?;
            if let Some(unit) = debit.unit.as_deref().filter(|u| u.len() > UNIT_BYTES_MAX) {
                return Err(LedgerError::invalid(
                    "unit",
                    format!(
                        "debit {}: {} bytes, at most {UNIT_BYTES_MAX} allowed",
                        debit.debit_id,
                        unit.len()
                    ),
                ));
            }
        }
        // Accounts are locked in id order, so two batches never wait on each other in a cycle.
        let mut by_account: BTreeMap<&AccountId, Vec<(usize, &UsageDebit)>> = BTreeMap::new();
        for (index, debit) in batch.iter().enumerate() {
            by_account.entry(&debit.account).or_default().push((index, debit));
        }
        let mut outcomes: Vec<Option<UsageOutcome>> = vec![None; batch.len()];
        let mut w = self.begin_write().await?;
        for (account, debits) in &by_account {
            let refs: Vec<&UsageDebit> = debits.iter().map(|(_, d)| *d).collect();
            let results = Self::apply_account_usage(&mut w, account, &refs, now).await?;
            for ((index, _), outcome) in debits.iter().zip(results) {
                outcomes[*index] = Some(outcome);
            }
        }
        w.tx.commit().await?;
        outcomes
            .into_iter()
            .map(|o| o.ok_or_else(|| LedgerError::corrupt("a debit of the batch got no outcome")))
            .collect()
    }

    async fn grants(
        &self,
        account: &AccountId,
        open_only: bool,
        page: PageRequest,
    ) -> Result<Page<GrantRecord>, LedgerError> {
        let size = apply::page_size(&page)?;
        let after = apply::grant_after(&page)?;
        self.snapshot(account).await?;
        let text = sql(&format!(
            "SELECT {GRANT_COLUMNS} FROM grants WHERE account_id = $1 AND grant_id > $2 \
             AND ($3 = 0 OR state = 'open') ORDER BY grant_id LIMIT $4"
        ));
        let rows = sqlx::query(&text)
            .bind(account.as_str())
            .bind(after)
            .bind(i64::from(open_only))
            .bind(i64::from(size) + 1)
            .fetch_all(&self.pool)
            .await?;
        let mut items = rows
            .iter()
            .map(grant_record_of)
            .collect::<Result<Vec<_>, _>>()?;
        let more = items.len() > size as usize;
        items.truncate(size as usize);
        let next_token = more
            .then(|| items.last().map(|r| apply::grant_token(r.grant.id.as_str())))
            .flatten();
        Ok(Page { items, next_token })
    }

    async fn entries(
        &self,
        filter: &EntryFilter,
        page: PageRequest,
    ) -> Result<Page<Entry>, LedgerError> {
        let size = apply::page_size(&page)?;
        let after = apply::i64_of("page_token", apply::entry_after(&page)?)?;
        if filter.kinds.len() > FILTER_KINDS_MAX {
            return Err(LedgerError::invalid("kinds", "at most 8 kinds"));
        }
        self.snapshot(&filter.account).await?;
        let mut text = format!(
            "SELECT {ENTRY_COLUMNS} FROM ledger_entries WHERE account_id = $1 AND seq > $2"
        );
        let mut next = 3;
        let mut placeholder = || {
            let p = format!("${next}");
            next += 1;
            p
        };
        if !filter.kinds.is_empty() {
            let list: Vec<String> = filter.kinds.iter().map(|_| placeholder()).collect();
            text.push_str(&format!(" AND kind IN ({})", list.join(", ")));
        }
        if filter.grant.is_some() {
            text.push_str(&format!(" AND grant_id = {}", placeholder()));
        }
        if filter.debit.is_some() {
            text.push_str(&format!(" AND debit_id = {}", placeholder()));
        }
        if filter.from.is_some() {
            text.push_str(&format!(" AND event_at >= tg_time({})", placeholder()));
        }
        if filter.until.is_some() {
            text.push_str(&format!(" AND event_at < tg_time({})", placeholder()));
        }
        text.push_str(&format!(" ORDER BY seq LIMIT {}", placeholder()));
        let text = sql(&text);
        let mut query = sqlx::query(&text).bind(filter.account.as_str()).bind(after);
        for kind in &filter.kinds {
            query = query.bind(kind.as_str());
        }
        if let Some(grant) = &filter.grant {
            query = query.bind(grant.as_str());
        }
        if let Some(debit) = &filter.debit {
            query = query.bind(debit.as_str());
        }
        if let Some(from) = filter.from {
            query = query.bind(from.millis());
        }
        if let Some(until) = filter.until {
            query = query.bind(until.millis());
        }
        let rows = query
            .bind(i64::from(size) + 1)
            .fetch_all(&self.pool)
            .await?;
        let mut items = rows.iter().map(entry_of).collect::<Result<Vec<_>, _>>()?;
        let more = items.len() > size as usize;
        items.truncate(size as usize);
        let next_token = more
            .then(|| items.last().map(|e| apply::entry_token(e.seq)))
            .flatten();
        Ok(Page { items, next_token })
    }

    async fn close_period(
        &self,
        command: ClosePeriod,
        now: Timestamp,
    ) -> Result<Outcome, LedgerError> {
        self.close_period_impl(command, now).await
    }

    async fn list_accounts(
        &self,
        page: PageRequest,
    ) -> Result<Page<AccountSnapshot>, LedgerError> {
        self.list_accounts_impl(page).await
    }

    async fn grants_with_credits(
        &self,
        account: &AccountId,
        limit: usize,
    ) -> Result<Vec<Grant>, LedgerError> {
        let records = self.grant_records_with_credits(account, limit).await?;
        Ok(records.into_iter().map(|r| r.grant).collect())
    }

    async fn grant_records_with_credits(
        &self,
        account: &AccountId,
        limit: usize,
    ) -> Result<Vec<GrantRecord>, LedgerError> {
        self.snapshot(account).await?;
        let rows = sqlx::query(&with_credits_query())
            .bind(account.as_str())
            .bind(with_credits_rows(limit))
            .fetch_all(&self.pool)
            .await?;
        grants_with_credits_of(account, &rows, limit)
    }

    async fn grants_expiring(
        &self,
        before: Timestamp,
        limit: u32,
    ) -> Result<Vec<GrantRecord>, LedgerError> {
        self.grants_expiring_impl(before, limit).await
    }

    async fn debits(
        &self,
        query: &DebitQuery,
        page: PageRequest,
    ) -> Result<Page<DebitRow>, LedgerError> {
        self.debits_impl(query, page).await
    }

    async fn entries_between(
        &self,
        query: &DebitQuery,
        page: PageRequest,
    ) -> Result<Page<Entry>, LedgerError> {
        self.entries_between_impl(query, page).await
    }

    async fn verify(&self, account: Option<&AccountId>) -> Result<VerifyReport, LedgerError> {
        let mut report = VerifyReport::default();
        if let Some(account) = account {
            self.verify_account(account, &mut report).await?;
            return Ok(report);
        }
        let text = sql(
            "SELECT account_id FROM accounts WHERE account_id > $1 ORDER BY account_id LIMIT $2",
        );
        let mut after = String::new();
        loop {
            let rows = sqlx::query(&text)
                .bind(after.as_str())
                .bind(i64::from(VERIFY_PAGE_ENTRIES))
                .fetch_all(&self.pool)
                .await?;
            for row in &rows {
                let id: AccountId = parse_id("account_id", get_text(row, "account_id")?)?;
                self.verify_account(&id, &mut report).await?;
                after = id.to_string();
            }
            if rows.len() < VERIFY_PAGE_ENTRIES as usize {
                return Ok(report);
            }
        }
    }

    async fn grant(
        &self,
        account: &AccountId,
        grant: &GrantId,
    ) -> Result<Option<GrantRecord>, LedgerError> {
        self.snapshot(account).await?;
        let text = sql(&format!(
            "SELECT {GRANT_COLUMNS} FROM grants WHERE account_id = $1 AND grant_id = $2"
        ));
        let row = sqlx::query(&text)
            .bind(account.as_str())
            .bind(grant.as_str())
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(grant_record_of).transpose()
    }
}

include!("sql_reports.rs");
