//! The durable ledger: the [`LedgerStore`] trait and its two implementations, PostgreSQL
//! ([`PostgresLedger`], production) and SQLite ([`SqliteLedger`], the embedded default), both
//! through sqlx with their migrations embedded and applied when a store opens.
//!
//! It owns the ledger's tables: append-only, per-account hash-chained entries; accounts with
//! their balance and the terms of the balance equation materialized; grants with their
//! remainders; debits with their draws; idempotency records. Every rule comes from
//! `tollgate-core` (the store rebuilds an `AccountBook` from the rows one operation needs and
//! writes back what the core moved). It must not depend on gRPC, Redis, or any service crate.

mod apply;
mod chain;
mod error;
mod model;
pub mod postgres;
pub mod sqlite;
mod store;
mod verify;

pub use chain::{entry_hash, GENESIS_HASH};
pub use error::{LedgerError, Refusal, RefusalCode};
pub use model::*;
pub use postgres::Store as PostgresLedger;
pub use sqlite::Store as SqliteLedger;
pub use store::LedgerStore;

/// The page token that starts an entry listing right after sequence number `seq` (how a reader
/// that remembers the last entry it saw resumes).
pub fn entry_page_token(seq: u64) -> String {
    apply::entry_token(seq)
}
