//! The edge node: answers Authorize, Capture, Release, Debit, Reverse, GetBalance and Quote
//! from the price book and account summaries cached in memory, and spends through the
//! regional store — one atomic call per decision (strict mode) or this node's in-memory lease,
//! flushed every few milliseconds (cached mode).
//!
//! Owns: the in-memory caches, the leases, the decision logic, and the adapters that speak to
//! callers. Depends on `tollgate-core` and `tollgate-region`; never on the ledger or the
//! authority's internals (it reaches the authority only over the coordination protocol).

pub mod catalogue;
pub mod clock;
pub mod coordination;
pub mod engine;
pub mod envoy;
pub mod error;
pub mod leases;
pub mod metrics;
pub mod server;
pub mod service;
pub mod settings;

pub use clock::{Clock, ManualClock, SystemClock};
pub use engine::{
    account_balance, AllocationAnswer, AllocationRequester, AuthorizeRequest, Authorized,
    BalanceView, Captured, DebitRequest, Debited, Decision, Engine, Priced, Quote, Refused, Spend,
    SUMMARY_REREAD_MS,
};
pub use error::EngineError;
pub use leases::{Declined, LeaseDecision, LeaseStats, Leases};
pub use settings::EdgeSettings;
