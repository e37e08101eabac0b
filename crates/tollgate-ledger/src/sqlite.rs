//! The embedded ledger on SQLite: INTEGER micro-credits and milliseconds, WAL journal, and one
//! writer at a time — an in-process lock serializes this process's writers, and every write
//! transaction starts with `BEGIN IMMEDIATE`, so a writer in another process waits too.

use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};

type Db = sqlx::Sqlite;

/// Connections the pool opens at most (readers run in parallel under WAL).
pub const SQLITE_POOL_CONNECTIONS_MAX: u32 = 8;
/// How long SQLite waits for another process's write lock before it gives up.
pub const SQLITE_BUSY_TIMEOUT_MS: u64 = 30_000;

/// The SQLite ledger. Cheap to clone: clones share the pool and the writer lock.
#[derive(Clone, Debug)]
pub struct Store {
    pool: sqlx::Pool<Db>,
    writer: Arc<tokio::sync::Mutex<()>>,
}

impl Store {
    /// Opens (creating if missing) the database file at `path` and applies the migrations.
    pub async fn open(path: &Path) -> Result<Self, LedgerError> {
        let options = SqliteConnectOptions::new().filename(path);
        Self::open_with(options).await
    }

    /// Opens a `sqlite://…` URL.
    pub async fn connect(url: &str) -> Result<Self, LedgerError> {
        Self::open_with(SqliteConnectOptions::from_str(url)?).await
    }

    async fn open_with(options: SqliteConnectOptions) -> Result<Self, LedgerError> {
        let options = options
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(Duration::from_millis(SQLITE_BUSY_TIMEOUT_MS))
            .foreign_keys(true);
        let pool = SqlitePoolOptions::new()
            .max_connections(SQLITE_POOL_CONNECTIONS_MAX)
            .connect_with(options)
            .await?;
        sqlx::migrate!("./migrations/sqlite").run(&pool).await?;
        Ok(Store {
            pool,
            writer: Arc::new(tokio::sync::Mutex::new(())),
        })
    }

    /// The pool, for tools and tests that inspect the tables directly.
    pub fn pool(&self) -> &sqlx::SqlitePool {
        &self.pool
    }

    async fn begin_write(&self) -> Result<WriteTx, LedgerError> {
        let guard = Arc::clone(&self.writer).lock_owned().await;
        Ok(WriteTx {
            tx: self.pool.begin_with("BEGIN IMMEDIATE").await?,
            _writer: Some(guard),
        })
    }

    /// A deferred transaction: under WAL its first read fixes one snapshot for the rest.
    async fn begin_read(&self) -> Result<Tx, LedgerError> {
        Ok(self.pool.begin().await?)
    }
}

/// SQLite columns already hold micro-credits and milliseconds: the conversions vanish, and
/// there are no row locks (the writer lock and `BEGIN IMMEDIATE` do that job). Text compares
/// byte-wise already (the `BINARY` collation).
fn sql(template: &str) -> String {
    template
        .replace("tg_credits(", "(")
        .replace("tg_micros(", "(")
        .replace("tg_time(", "(")
        .replace("tg_ms(", "(")
        .replace("{lock}", "")
        .replace("{bytes}", "")
}

include!("sql_body.rs");
