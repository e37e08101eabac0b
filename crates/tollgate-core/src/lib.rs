//! Tollgate's rules, pure: exact amounts, grants and the burn-down order, holds, recurring
//! grants and rollover, price resolution, ledger entry kinds and the balance equation, and
//! [`account::AccountBook`], the reference model that applies them to one account.
//!
//! Every function here is a function of its arguments: no I/O, no async runtime, no clock
//! reads ("now" is always a parameter). Stores, services and the simulator build on this
//! crate; it must never depend on any of them.

pub mod account;
pub mod burn;
pub mod command;
pub mod credits;
pub mod error;
pub mod grant;
pub mod hold;
pub mod ids;
pub mod ledger;
pub mod price;
pub mod rate;
pub mod recurrence;
pub mod time;

pub use account::{AccountBook, DebitRecord, Movement, RefundGrantTerms};
pub use burn::{plan_burn, BurnPlan, BurnRequest, Draw, Reserved, Shortfall};
pub use credits::{Credits, MICROS_PER_CREDIT};
pub use error::{AmountError, BookError, GrantError, IdError, TimeError};
pub use grant::{burn_order, Currency, Grant, GrantSource, GrantState, Money, Scope};
pub use hold::{Capture, Hold, HoldError, HoldStatus};
pub use ids::{
    AccountId, ActorId, DebitId, FeatureKey, GrantId, HoldId, IdempotencyKey, LeaseId, PlanId,
    RegionId,
};
pub use ledger::{check_invariants, EntryKind, InvariantViolation, Totals};
pub use price::{
    Audience, Contract, PriceBook, PriceBookVersion, PriceError, PriceQuery, PriceRule,
    ResolvedPrice,
};
pub use rate::{cost, Quantity, Rate};
pub use recurrence::{
    GrantSchedule, Period, PeriodUnit, Recurrence, RolloverPolicy, RolloverSplit, ScheduleError,
};
pub use time::Timestamp;
