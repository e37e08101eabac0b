//! The `tollgate-edge` binary end to end: a redis-server and an OTLP collector of the test's
//! own; decisions over gRPC; then SIGTERM, after which every cached decision is in the usage
//! stream, the lease is back in the region, and the spans reached the collector. And the edge
//! with its authority unreachable: a spend the region cannot pay is refused as such.

use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use tollgate_core::{
    AccountId, Credits, FeatureKey, GrantId, IdempotencyKey, PriceBook, PriceBookVersion, Rate,
    Scope, Timestamp,
};
use tollgate_proto::pb;
use tollgate_region::{
    AccountSummary, EnforcementMode, OutsideCredits, RedisRegionStore, RegionStore, SegmentSpec,
    RETAIN_MS_DEFAULT,
};
use tollgate_testkit::RedisServer;

/// A collector that keeps the names of the spans it receives.
#[derive(Clone, Default)]
struct Collector(Arc<Mutex<Vec<String>>>);

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let names = request
            .into_inner()
            .resource_spans
            .into_iter()
            .flat_map(|r| r.scope_spans)
            .flat_map(|s| s.spans)
            .map(|span| span.name);
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend(names);
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

/// The edge process this test started; ended by its own id if the test fails half way.
struct Edge(Child);

impl Drop for Edge {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn seed(store: &RedisRegionStore) -> AccountId {
    seed_held(store, 100, 0, EnforcementMode::Cached).await
}

/// The price book and an account of which the region holds `held` credits, while its summary
/// says `outside` more are held outside the region (by the authority or other regions).
async fn seed_held(
    store: &RedisRegionStore,
    held: i64,
    outside: i64,
    mode: EnforcementMode,
) -> AccountId {
    let book = PriceBook::new(vec![PriceBookVersion {
        version: 1,
        effective_from: Timestamp::EPOCH,
        default: [(FeatureKey::new("gen").unwrap(), Rate::parse("0.5").unwrap())].into(),
        ..PriceBookVersion::default()
    }]);
    store.publish_price_book(&book).await.unwrap();
    let account = AccountId::new("acme").unwrap();
    let segment = SegmentSpec {
        grant_id: GrantId::new("g1").unwrap(),
        amount: Credits::from_whole(held).unwrap(),
        priority: 50,
        effective_at: Timestamp::EPOCH,
        expires_at: None,
        scope: Scope::All,
    };
    store
        .install_segment(
            &account,
            &IdempotencyKey::new("seed").unwrap(),
            &segment,
            Timestamp::EPOCH,
        )
        .await
        .unwrap();
    let summary = AccountSummary {
        account: account.clone(),
        created_at: Timestamp::EPOCH,
        plan: None,
        mode,
        contracts: Vec::new(),
        balance: Credits::from_whole(held + outside).unwrap(),
        overdraft_limit: Credits::ZERO,
        rate_limited: Default::default(),
        published_at: Timestamp::EPOCH,
        outside: if outside > 0 {
            vec![OutsideCredits {
                amount: Credits::from_whole(outside).unwrap(),
                effective_at: Timestamp::EPOCH,
                expires_at: None,
                scope: Scope::All,
            }]
        } else {
            Vec::new()
        },
        debt_basis: Credits::ZERO,
        region_moves: 0,
    };
    store.publish_account(&summary).await.unwrap();
    account
}

/// The Enforcement client the tests call the edge with (key `k`).
type Client = pb::enforcement_client::EnforcementClient<
    tonic::service::interceptor::InterceptedService<
        tonic::transport::Channel,
        fn(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status>,
    >,
>;

fn bearer_k(mut request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
    let header: tonic::metadata::MetadataValue<_> = "Bearer k".parse().expect("header value");
    request.metadata_mut().insert("authorization", header);
    Ok(request)
}

/// Starts the edge binary for region `region` on `redis` (keys under `tg:<region>`, enforce
/// key `k`, free ports) with `env` on top; returns it and a client, once it listens.
async fn start_edge(region: &str, redis: &RedisServer, env: &[(&str, String)]) -> (Edge, Client) {
    let listen = format!("127.0.0.1:{}", free_port());
    let edge = Edge(
        Command::new(env!("CARGO_BIN_EXE_tollgate-edge"))
            .env("TOLLGATE_REGION", region)
            .env("TOLLGATE_REDIS_URL", redis.url())
            .env("TOLLGATE_KEY_PREFIX", format!("tg:{region}"))
            .env("TOLLGATE_LISTEN", &listen)
            .env("TOLLGATE_HTTP_LISTEN", format!("127.0.0.1:{}", free_port()))
            .env("TOLLGATE_ENFORCE_API_KEY", "k")
            .envs(env.iter().map(|(name, value)| (*name, value.as_str())))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    let channel = loop {
        if let Ok(channel) = tonic::transport::Channel::from_shared(format!("http://{listen}"))
            .unwrap()
            .connect()
            .await
        {
            break channel;
        }
        assert!(
            Instant::now() < deadline,
            "the edge did not start listening"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let interceptor: fn(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> = bearer_k;
    (
        edge,
        pb::enforcement_client::EnforcementClient::with_interceptor(channel, interceptor),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_flushes_returns_leases_and_spans_reach_the_collector() {
    let redis = RedisServer::start().unwrap();
    let store = RedisRegionStore::connect(&redis.url(), "tg:e2e", RETAIN_MS_DEFAULT)
        .await
        .unwrap();
    let account = seed(&store).await;
    store.create_usage_group("audit").await.unwrap();

    let collector = Collector::default();
    let otlp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let otlp_address = otlp.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(collector.clone()))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(otlp)),
    );

    let (edge, mut client) = start_edge(
        "e2e",
        &redis,
        &[
            ("TOLLGATE_OTLP_ENDPOINT", format!("http://{otlp_address}")),
            ("RUST_LOG", "info".to_owned()),
        ],
    )
    .await;
    for n in 0..5 {
        let request = pb::DebitRequest {
            idempotency_key: format!("e2e-{n}"),
            account_id: "acme".into(),
            usage: Some(pb::Usage {
                feature: "gen".into(),
                amount: Some(pb::usage::Amount::Quantity("2".into())),
            }),
            ..pb::DebitRequest::default()
        };
        let reply = client.debit(request).await.unwrap().into_inner();
        assert!(
            matches!(reply.outcome, Some(pb::debit_reply::Outcome::Debited(_))),
            "{reply:?}"
        );
    }
    // The first decision on a cold account is strict; the lease is taken in the background.
    let mut leases = 0;
    for _ in 0..200 {
        leases = store
            .view(&account, Timestamp::from_millis(1).unwrap())
            .await
            .unwrap()
            .leases;
        if leases == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(leases, 1, "the edge holds a lease while it serves");

    let mut edge = edge;
    let pid = edge.0.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let deadline = Instant::now() + Duration::from_secs(20);
    let exit = loop {
        if let Some(status) = edge.0.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "the edge did not stop after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(exit.success(), "graceful shutdown exits cleanly: {exit:?}");

    let records = store.read_usage("audit", "auditor", 100).await.unwrap();
    let keys: std::collections::BTreeSet<String> =
        records.iter().map(|r| r.key.to_string()).collect();
    assert_eq!(
        keys,
        (0..5).map(|n| format!("e2e-{n}")).collect(),
        "every cached decision was flushed before exit"
    );
    let view = store
        .view(&account, Timestamp::from_millis(1).unwrap())
        .await
        .unwrap();
    assert_eq!(
        (view.leases, view.pool()),
        (0, Credits::from_whole(95).unwrap()),
        "the lease went back; 5 credits were spent"
    );
    let spans = collector.0.lock().unwrap().clone();
    assert!(
        spans
            .iter()
            .filter(|name| name.as_str() == "tollgate.enforcement")
            .count()
            >= 5,
        "spans exported: {spans:?}"
    );
}

/// The credits the region holds of `account`.
async fn pool(store: &RedisRegionStore, account: &AccountId) -> Credits {
    store
        .view(account, Timestamp::from_millis(1).unwrap())
        .await
        .unwrap()
        .pool()
}

/// A strict Debit of `credits` (`gen` costs 0.5 a unit) under `key`.
fn debit_of_credits(key: &str, credits: i64) -> pb::DebitRequest {
    pb::DebitRequest {
        idempotency_key: key.into(),
        account_id: "acme".into(),
        usage: Some(pb::Usage {
            feature: "gen".into(),
            amount: Some(pb::usage::Amount::Quantity((credits * 2).to_string())),
        }),
        ..pb::DebitRequest::default()
    }
}

/// The edge's cold path asks an authority at an address nobody listens on. A spend the region
/// cannot pay is then refused as AUTHORITY_UNREACHABLE, not as insufficient credits (the
/// authority may hold the rest), with the account's balance as last known and nothing charged;
/// a spend the region can pay is decided from what it holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spend_beyond_the_region_with_the_authority_unreachable_is_refused_as_such() {
    let redis = RedisServer::start().unwrap();
    let store = RedisRegionStore::connect(&redis.url(), "tg:cut", RETAIN_MS_DEFAULT)
        .await
        .unwrap();
    let account = seed_held(&store, 10, 990, EnforcementMode::Strict).await;

    let (_edge, mut client) = start_edge(
        "cut",
        &redis,
        &[
            // A port that was free a moment ago: the cold path's connection is refused.
            (
                "TOLLGATE_AUTHORITY_URL",
                format!("http://127.0.0.1:{}", free_port()),
            ),
            ("RUST_LOG", "warn".to_owned()),
        ],
    )
    .await;

    let reply = client
        .debit(debit_of_credits("beyond", 50))
        .await
        .unwrap()
        .into_inner();
    let Some(pb::debit_reply::Outcome::Refused(refusal)) = reply.outcome else {
        panic!("{reply:?}");
    };
    assert_eq!(
        pb::RefusalCode::try_from(refusal.code),
        Ok(pb::RefusalCode::AuthorityUnreachable),
        "{refusal:?}"
    );
    assert_eq!(
        (
            refusal.cost.as_str(),
            refusal.available.as_str(),
            refusal.balance.as_str()
        ),
        ("50", "10", "1000"),
        "{refusal:?}"
    );
    assert_eq!(
        pool(&store, &account).await,
        Credits::from_whole(10).unwrap(),
        "nothing charged"
    );

    let reply = client
        .debit(debit_of_credits("within", 5))
        .await
        .unwrap()
        .into_inner();
    let Some(pb::debit_reply::Outcome::Debited(debited)) = reply.outcome else {
        panic!("{reply:?}");
    };
    assert_eq!(debited.balance_after, "995", "{debited:?}");
    assert_eq!(
        pool(&store, &account).await,
        Credits::from_whole(5).unwrap()
    );
}
