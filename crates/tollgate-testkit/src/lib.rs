//! Ephemeral servers for tests and benchmarks: each starts from the installed binaries in its own
//! temporary directory on a free port of 127.0.0.1 (never the machine's own PostgreSQL on 5432 or
//! Redis on 6379), so tests run in parallel and can kill or restart their own servers.
//!
//! A missing binary is an error that says how to install it, never a silent skip. Used by tests
//! and benchmarks only; no production crate may depend on it, and it depends on no other
//! Tollgate crate.

pub mod postgres;
pub mod process;
pub mod proxy;
pub mod redis;
pub mod tls;

pub use postgres::PostgresServer;
pub use process::TestkitError;
pub use proxy::TcpProxy;
pub use redis::RedisServer;
