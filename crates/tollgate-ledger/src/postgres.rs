//! The production ledger on PostgreSQL: NUMERIC(38,6) money, timestamptz instants, and
//! `SELECT … FOR UPDATE` on the account row in every mutating transaction, so concurrent
//! writers to one account queue on its row while other accounts proceed.

use std::str::FromStr;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

type Db = sqlx::Postgres;

/// Connections the pool opens at most.
pub const PG_POOL_CONNECTIONS_MAX: u32 = 16;
/// How long a caller waits for a pooled connection.
pub const PG_ACQUIRE_TIMEOUT_MS: u64 = 5_000;

/// The PostgreSQL ledger. Cheap to clone: clones share the pool.
#[derive(Clone, Debug)]
pub struct Store {
    pool: sqlx::Pool<Db>,
}

impl Store {
    /// Connects to `url` (`postgres://…`) and applies the embedded migrations.
    pub async fn connect(url: &str) -> Result<Self, LedgerError> {
        let options = PgConnectOptions::from_str(url)?;
        let pool = PgPoolOptions::new()
            .max_connections(PG_POOL_CONNECTIONS_MAX)
            .acquire_timeout(Duration::from_millis(PG_ACQUIRE_TIMEOUT_MS))
            .connect_with(options)
            .await?;
        sqlx::migrate!("./migrations/postgres").run(&pool).await?;
        Ok(Store { pool })
    }

    /// The pool, for tools and tests that inspect the tables directly.
    pub fn pool(&self) -> &sqlx::PgPool {
        &self.pool
    }

    async fn begin_write(&self) -> Result<WriteTx, LedgerError> {
        Ok(WriteTx {
            tx: self.pool.begin().await?,
            _writer: None,
        })
    }

    /// A read-only transaction that sees one snapshot for all its statements.
    async fn begin_read(&self) -> Result<Tx, LedgerError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            .execute(&mut *tx)
            .await?;
        Ok(tx)
    }
}

/// PostgreSQL runs the templates as written (the `tg_*` functions come from the migration);
/// `{bytes}` makes text compare byte-wise whatever the database's collation.
fn sql(template: &str) -> String {
    template
        .replace("{lock}", "FOR UPDATE")
        .replace("{bytes}", " COLLATE \"C\"")
}

include!("sql_body.rs");
