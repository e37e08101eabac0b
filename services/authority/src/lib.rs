//! The authority node: the Admin and Coordination gRPC services over `tollgate-authority`,
//! behind API-key authentication with scopes, with gRPC health and reflection; the background
//! loops (reconciliation, lifecycle, notifications); and the embedded single node (`dev`):
//! authority and an in-process edge on SQLite and the in-memory regional store. It owns
//! configuration and wiring; the logic lives in `tollgate-authority` and below.

pub mod admin;
pub mod audit;
pub mod auth;
pub mod background;
pub mod balance;
pub mod config;
pub mod console;
pub mod coordination;
pub mod dev;
pub mod dev_keys;
pub mod encode;
pub mod lifecycle;
pub mod metrics;
pub mod parked;
pub mod plans;
pub mod purchases;
pub mod server;

use std::sync::Arc;

use tollgate_ledger::{LedgerError, LedgerStore, PostgresLedger, SqliteLedger};

/// Opens the ledger a URL names: `postgres://…` or `sqlite://path` (created if missing).
pub async fn open_ledger(url: &str) -> Result<Arc<dyn LedgerStore>, LedgerError> {
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        return Ok(Arc::new(PostgresLedger::connect(url).await?));
    }
    if let Some(path) = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))
    {
        if let Some(parent) = std::path::Path::new(path).parent() {
            if !parent.as_os_str().is_empty() {
                std::fs::create_dir_all(parent).map_err(|e| LedgerError::InvalidArgument {
                    field: "database_url",
                    message: format!("cannot create {}: {e}", parent.display()),
                })?;
            }
        }
        return Ok(Arc::new(
            SqliteLedger::open(std::path::Path::new(path)).await?,
        ));
    }
    Err(LedgerError::InvalidArgument {
        field: "database_url",
        message: "must start with postgres:// or sqlite:".into(),
    })
}
