//! The edge's cold path over real gRPC: an edge with no allocation for an account asks the
//! authority's Coordination service (`RequestAllocation`), which installs segments and
//! publishes the account's summary in the region's Redis; the edge then decides. The authority
//! runs on a SQLite ledger and a redis-server started for the test.

use std::collections::BTreeMap;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tollgate_authority::{Authority, AuthoritySettings, StateStore, SystemClock};
use tollgate_authority_service::coordination::CoordinationService;
use tollgate_core::command::{CreateAccount, GrantTerms, IssueGrant, Memo, Metadata};
use tollgate_core::{
    AccountId, Credits, FeatureKey, GrantId, GrantSource, IdempotencyKey, PriceBookVersion,
    Quantity, Rate, RegionId, Timestamp,
};
use tollgate_edge::coordination::AuthorityClient;
use tollgate_edge::{DebitRequest, Decision, EdgeSettings, Engine, Refused, Spend};
use tollgate_ledger::{LedgerStore, SqliteLedger};
use tollgate_proto::pb;
use tollgate_region::{RedisRegionStore, RegionStore, RETAIN_MS_DEFAULT};
use tollgate_testkit::RedisServer;

fn key(text: &str) -> IdempotencyKey {
    IdempotencyKey::new(text).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cold_account_is_allocated_over_grpc_then_decided() {
    let redis = RedisServer::start().unwrap();
    let store = Arc::new(
        RedisRegionStore::connect(&redis.url(), "tg:cold", RETAIN_MS_DEFAULT)
            .await
            .unwrap(),
    );
    let dir = tempfile::tempdir().unwrap();
    let ledger: Arc<dyn LedgerStore> = Arc::new(
        SqliteLedger::open(&dir.path().join("ledger.db"))
            .await
            .unwrap(),
    );
    let state = StateStore::connect(&format!(
        "sqlite://{}",
        dir.path().join("authority.db").display()
    ))
    .await
    .unwrap();
    let eu = RegionId::new("eu").unwrap();
    let clock = Arc::new(SystemClock);
    let authority = Arc::new(Authority::new(
        Arc::clone(&ledger),
        state,
        BTreeMap::from([(eu.clone(), Arc::clone(&store))]),
        clock.clone(),
        AuthoritySettings::default(),
    ));

    let now = tollgate_authority::Clock::now(clock.as_ref());
    let version = PriceBookVersion {
        version: 1,
        effective_from: Timestamp::EPOCH,
        default: [(
            FeatureKey::new("chat").unwrap(),
            Rate::parse("0.5").unwrap(),
        )]
        .into(),
        ..PriceBookVersion::default()
    };
    authority
        .define_feature(&tollgate_authority::Feature {
            feature: FeatureKey::new("chat").unwrap(),
            unit: "message".to_owned(),
            description: String::new(),
        })
        .await
        .unwrap();
    authority.publish_price_version(&version).await.unwrap();
    let acme = AccountId::new("acme").unwrap();
    let create = CreateAccount {
        key: key("create"),
        account: acme.clone(),
        overdraft_limit: Credits::ZERO,
        metadata: Metadata::default(),
    };
    ledger.create_account(create, now).await.unwrap();
    let terms = GrantTerms::new(
        GrantId::new("bought").unwrap(),
        Credits::from_whole(40).unwrap(),
        GrantSource::Purchase,
    );
    let grant = IssueGrant {
        key: key("grant"),
        account: acme.clone(),
        terms,
        metadata: Metadata::default(),
        memo: Memo::default(),
    };
    ledger.issue_grant(grant, now).await.unwrap().unwrap();

    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let serving = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(pb::coordination_server::CoordinationServer::new(
                CoordinationService::new(Arc::clone(&authority)),
            ))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );

    assert_eq!(
        store.account_summary(&acme).await.unwrap(),
        None,
        "the region knows nothing of acme yet"
    );
    let client = AuthorityClient::new(
        &format!("http://{address}"),
        eu.clone(),
        None,
        "edge-test".into(),
    )
    .unwrap();
    let engine = Engine::new(
        Arc::clone(&store),
        EdgeSettings::new(eu),
        Arc::new(tollgate_edge::SystemClock),
    )
    .with_allocator(Arc::new(client));
    let debit = |account: &AccountId, k: &str| DebitRequest {
        account: account.clone(),
        key: key(k),
        feature: FeatureKey::new("chat").unwrap(),
        spend: Spend::Quantity(Quantity::parse("4").unwrap()),
        actor: None,
        mode: None,
        event_time: None,
    };
    let decided = engine.debit(debit(&acme, "d1")).await.unwrap();
    assert!(
        matches!(&decided, Decision::Done(d) if d.priced.cost == Credits::from_whole(2).unwrap()),
        "{decided:?}"
    );
    assert!(
        store.account_summary(&acme).await.unwrap().is_some(),
        "the authority published the summary"
    );
    let view = store.view(&acme, engine.now()).await.unwrap();
    assert!(
        view.pool().is_positive() && view.pool() <= Credits::from_whole(38).unwrap(),
        "allocated from the 40 granted, 2 spent: {view:?}"
    );

    let stranger = AccountId::new("nobody").unwrap();
    assert_eq!(
        engine.debit(debit(&stranger, "d2")).await.unwrap(),
        Decision::Refused(Refused::UnknownAccount(stranger))
    );
    serving.abort();
}
