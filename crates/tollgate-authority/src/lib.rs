//! The authority's logic: it reconciles every region's usage stream into the durable ledger,
//! allocates credits to regions and answers their cold-path requests, runs the credit
//! lifecycle on a clock it is given (recurring grants, rollover, expiry once every region has
//! reconciled past it, stuck holds), tops accounts up through their hooks, notifies through a
//! transactional outbox (signed webhooks and a watch stream), and reports usage and revenue.
//!
//! Generic over the ledger (`tollgate_ledger::LedgerStore`) and the regional store
//! (`tollgate_region::RegionStore`), so the same code runs on PostgreSQL + Redis and on the
//! embedded SQLite + in-memory node. It must not depend on gRPC, the wire contract or any
//! service crate: `services/authority` decodes and encodes around it.

pub mod accounts;
pub mod allocator;
mod authority;
mod catalogue;
pub mod clock;
pub mod closing;
pub mod error;
pub mod events;
pub mod http;
pub mod insights;
pub mod metrics;
pub mod notifier;
pub mod parked;
pub mod plans;
pub mod purchases;
pub mod reconciler;
pub mod scheduler;
pub mod settings;
pub mod state;
pub mod stripe;
pub mod topup;

pub use accounts::SettingsChange;
pub use authority::Authority;
pub use clock::{Clock, ManualClock, SystemClock};
pub use closing::{GrantCloser, LedgerCloser};
pub use error::{AuthorityError, Result};
pub use events::{Event, EventKind};
pub use parked::{ParkedAction, ParkedResolved, ResolveParked};
pub use settings::{AuthoritySettings, WebhookEndpoint};
pub use state::{AccountSettings, Feature, StateStore, TopUpSettings};
