//! The audit table: one row per Admin change (and per refused attempt of a known key), with
//! the name of the API key that made it. Append-only: the store inserts and reads, never
//! updates or deletes, and on SQLite triggers refuse an UPDATE or DELETE from anyone else.

use sqlx::AnyPool;
use tollgate_core::Timestamp;

use super::{count, int, text, time, StateStore};
use crate::error::Result;

/// Most audit records one read returns.
pub const AUDIT_PAGE_MAX: u32 = 1_000;

const AUDIT_POSTGRES: &str = "CREATE TABLE IF NOT EXISTS authority_audit (\
     seq BIGSERIAL PRIMARY KEY, recorded_ms BIGINT NOT NULL, key_name TEXT NOT NULL, \
     method TEXT NOT NULL, account_id TEXT NOT NULL, idempotency_key TEXT NOT NULL, \
     outcome TEXT NOT NULL)";
const AUDIT_SQLITE: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS authority_audit (\
     seq INTEGER PRIMARY KEY AUTOINCREMENT, recorded_ms BIGINT NOT NULL, \
     key_name TEXT NOT NULL, method TEXT NOT NULL, account_id TEXT NOT NULL, \
     idempotency_key TEXT NOT NULL, outcome TEXT NOT NULL)",
    "CREATE TRIGGER IF NOT EXISTS authority_audit_no_update BEFORE UPDATE ON authority_audit \
     BEGIN SELECT RAISE(ABORT, 'authority_audit is append-only'); END",
    "CREATE TRIGGER IF NOT EXISTS authority_audit_no_delete BEFORE DELETE ON authority_audit \
     BEGIN SELECT RAISE(ABORT, 'authority_audit is append-only'); END",
];
const AUDIT_INDEX: &str = "CREATE INDEX IF NOT EXISTS authority_audit_account ON \
     authority_audit (account_id, seq)";

pub(super) async fn create_tables(pool: &AnyPool, sqlite: bool) -> Result<()> {
    if sqlite {
        for statement in AUDIT_SQLITE {
            sqlx::query(statement).execute(pool).await?;
        }
    } else {
        sqlx::query(AUDIT_POSTGRES).execute(pool).await?;
    }
    sqlx::query(AUDIT_INDEX).execute(pool).await?;
    Ok(())
}

/// One audited call, as written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuditEntry {
    pub key_name: String,
    pub method: String,
    /// Empty when the call is not about one account.
    pub account_id: String,
    pub idempotency_key: String,
    /// `done` or `refused`.
    pub outcome: String,
}

/// An audit entry as read back: its position and when it was written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuditRow {
    pub seq: i64,
    pub recorded_at: Timestamp,
    pub entry: AuditEntry,
}

impl StateStore {
    /// Appends one audit entry, written at `at`.
    pub async fn append_audit(&self, entry: &AuditEntry, at: Timestamp) -> Result<()> {
        sqlx::query(
            "INSERT INTO authority_audit (recorded_ms, key_name, method, account_id, \
             idempotency_key, outcome) VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(at.millis())
        .bind(&entry.key_name)
        .bind(&entry.method)
        .bind(&entry.account_id)
        .bind(&entry.idempotency_key)
        .bind(&entry.outcome)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Audit entries after position `after`, oldest first, of one account (`""`: all), at
    /// most `limit` (capped at [`AUDIT_PAGE_MAX`]).
    pub async fn audit_after(
        &self,
        after: i64,
        account: &str,
        limit: u32,
    ) -> Result<Vec<AuditRow>> {
        let rows = sqlx::query(
            "SELECT seq, recorded_ms, key_name, method, account_id, idempotency_key, outcome \
             FROM authority_audit WHERE seq > $1 AND ($2 = '' OR account_id = $2) \
             ORDER BY seq LIMIT $3",
        )
        .bind(after)
        .bind(account)
        .bind(count(limit.min(AUDIT_PAGE_MAX)))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                Ok(AuditRow {
                    seq: int(row, "seq")?,
                    recorded_at: time(int(row, "recorded_ms")?)?,
                    entry: AuditEntry {
                        key_name: text(row, "key_name")?,
                        method: text(row, "method")?,
                        account_id: text(row, "account_id")?,
                        idempotency_key: text(row, "idempotency_key")?,
                        outcome: text(row, "outcome")?,
                    },
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn entries_append_and_read_back_in_order_and_never_change() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("state.db").display());
        let state = StateStore::connect(&url).await.unwrap();
        let entry = |key: &str, account: &str| AuditEntry {
            key_name: key.into(),
            method: "IssueGrant".into(),
            account_id: account.into(),
            idempotency_key: format!("{key}-{account}"),
            outcome: "done".into(),
        };
        let at = Timestamp::from_millis(1_000).unwrap();
        state.append_audit(&entry("ops", "acme"), at).await.unwrap();
        state
            .append_audit(&entry("support", "globex"), at)
            .await
            .unwrap();
        state
            .append_audit(&entry("ops", "globex"), at)
            .await
            .unwrap();
        let all = state.audit_after(0, "", 10).await.unwrap();
        assert_eq!(all.len(), 3);
        assert!(all.windows(2).all(|pair| pair[0].seq < pair[1].seq));
        let globex = state.audit_after(0, "globex", 10).await.unwrap();
        let keys: Vec<&str> = globex.iter().map(|r| r.entry.key_name.as_str()).collect();
        assert_eq!(keys, ["support", "ops"]);
        let page = state.audit_after(all[0].seq, "", 1).await.unwrap();
        assert_eq!(page[0].entry, entry("support", "globex"));
        let pool = &state.pool;
        assert!(sqlx::query("UPDATE authority_audit SET key_name = 'x'")
            .execute(pool)
            .await
            .is_err());
        assert!(sqlx::query("DELETE FROM authority_audit")
            .execute(pool)
            .await
            .is_err());
        assert_eq!(state.audit_after(0, "", 10).await.unwrap().len(), 3);
    }
}
