//! A fresh edge for each input, as `crates/tollgate-edge/tests/hostile_input.rs` sets one up:
//! the real `EnforcementService` and engine over a `MemoryRegionStore` holding one funded
//! account in strict mode, one pending hold and one debit (so `Capture`, `Release` and `Reverse`
//! have something to name), a manual clock, and no standing lease (no background writes).
//! Nothing is kept from one input to the next, so every input replays alike.

use std::sync::{Arc, OnceLock};

use tollgate_core::{
    AccountId, Credits, FeatureKey, PriceBook, PriceBookVersion, Rate, RegionId, Timestamp,
};
use tollgate_edge::metrics::Metrics;
use tollgate_edge::service::EnforcementService;
use tollgate_edge::{EdgeSettings, Engine, ManualClock};
use tollgate_proto::pb;
use tollgate_proto::pb::enforcement_server::Enforcement;
use tollgate_region::conformance::{install, segment};
use tollgate_region::{
    AccountSummary, EnforcementMode, MemoryRegionStore, RegionStore, UsageRecord,
};
use tonic::Request;

/// The funded account the seeds name.
pub const ACCOUNT: &str = "acme";
/// Its credits, in one segment.
pub const FUNDS: &str = "1000000";
/// The edge's clock, which never moves: event times are judged against it.
pub const NOW_MS: i64 = 1_700_000_000_000;
/// Keys of the hold and the debit made before each input.
pub const SETUP_HOLD_KEY: &str = "setup-hold";
pub const SETUP_DEBIT_KEY: &str = "setup-debit";
const USAGE_GROUP: &str = "fuzz";

/// One thread runs every input: the service's futures run to completion inside a call.
pub fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("a current-thread runtime")
    })
}

fn metrics() -> Arc<Metrics> {
    static METRICS: OnceLock<Arc<Metrics>> = OnceLock::new();
    Arc::clone(METRICS.get_or_init(|| Arc::new(Metrics::new().expect("edge metrics"))))
}

pub struct Edge {
    pub store: Arc<MemoryRegionStore>,
    pub service: EnforcementService<MemoryRegionStore>,
    /// The setup hold's id, which `Capture` and `Release` seeds name.
    pub hold_id: String,
    reads: u64,
}

/// What a failed call must leave as it was: the funded account's regional state.
#[derive(Debug, PartialEq, Eq)]
pub struct Snapshot {
    pub view: tollgate_region::AccountView,
    pub summary: Option<AccountSummary>,
}

impl Edge {
    pub async fn start() -> Edge {
        let store = Arc::new(MemoryRegionStore::default());
        let account = AccountId::new(ACCOUNT).expect("account id");
        let feature = |name: &str| FeatureKey::new(name).expect("feature key");
        let book = PriceBook::new(vec![PriceBookVersion {
            version: 1,
            effective_from: Timestamp::EPOCH,
            default: [
                (feature("gen"), Rate::parse("0.5").expect("rate")),
                (feature("lookup"), Rate::parse("1").expect("rate")),
                (feature("token"), Rate::parse("0.0000015").expect("rate")),
            ]
            .into(),
            ..PriceBookVersion::default()
        }]);
        store.publish_price_book(&book).await.expect("price book");
        let mut spec = segment("g1", FUNDS, 50, None);
        spec.effective_at = Timestamp::EPOCH;
        install(store.as_ref(), &account, spec).await;
        store
            .publish_account(&AccountSummary {
                account: account.clone(),
                created_at: Timestamp::EPOCH,
                plan: None,
                mode: EnforcementMode::Strict,
                contracts: Vec::new(),
                balance: Credits::parse(FUNDS).expect("funds"),
                overdraft_limit: Credits::ZERO,
                rate_limited: Default::default(),
                published_at: Timestamp::from_millis(NOW_MS).expect("now"),
                outside: Vec::new(),
                debt_basis: Credits::ZERO,
                region_moves: 0,
            })
            .await
            .expect("account summary");
        store
            .create_usage_group(USAGE_GROUP)
            .await
            .expect("usage group");
        let clock = Arc::new(ManualClock::new(
            Timestamp::from_millis(NOW_MS).expect("now"),
        ));
        let mut settings = EdgeSettings::new(RegionId::new("eu").expect("region"));
        settings.lease_credits = Credits::ZERO;
        let engine = Arc::new(Engine::new(Arc::clone(&store), settings, clock));
        engine
            .catalogue()
            .reload_prices(store.as_ref())
            .await
            .expect("prices");
        let service = EnforcementService::new(engine, metrics());
        let usage = Some(pb::Usage {
            feature: "gen".into(),
            amount: Some(pb::usage::Amount::Quantity("2".into())),
        });
        let held = service
            .authorize(Request::new(pb::AuthorizeRequest {
                idempotency_key: SETUP_HOLD_KEY.into(),
                account_id: ACCOUNT.into(),
                usage: usage.clone(),
                ttl_seconds: 3_600,
                ..Default::default()
            }))
            .await
            .expect("setup hold")
            .into_inner();
        let Some(pb::authorize_reply::Outcome::Authorized(held)) = held.outcome else {
            panic!("setup hold refused: {held:?}")
        };
        service
            .debit(Request::new(pb::DebitRequest {
                idempotency_key: SETUP_DEBIT_KEY.into(),
                account_id: ACCOUNT.into(),
                usage,
                ..Default::default()
            }))
            .await
            .expect("setup debit");
        let mut edge = Edge {
            store,
            service,
            hold_id: held.hold_id,
            reads: 0,
        };
        // Drain the setup's usage records, so that the next read shows only the input's.
        edge.usage_since_last_read().await;
        edge
    }

    pub async fn snapshot(&self) -> Snapshot {
        let account = AccountId::new(ACCOUNT).expect("account id");
        let now = Timestamp::from_millis(NOW_MS).expect("now");
        Snapshot {
            view: self.store.view(&account, now).await.expect("view"),
            summary: self.store.account_summary(&account).await.expect("summary"),
        }
    }

    /// Usage records appended since the last read: a fresh consumer of the group each time.
    pub async fn usage_since_last_read(&mut self) -> Vec<UsageRecord> {
        self.reads += 1;
        self.store
            .read_usage(USAGE_GROUP, &format!("c{}", self.reads), 1_000)
            .await
            .expect("usage")
    }
}
