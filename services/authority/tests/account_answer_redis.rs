//! The edge answers for the account, not for the region's slice, on a real regional Redis: a
//! redis-server of the test's own, an authority (SQLite ledger in a temporary directory) serving
//! Admin and Coordination over gRPC on 127.0.0.1, and an edge gRPC server (Enforcement, the
//! Envoy adapter, health and reflection) on `RedisRegionStore` whose cold path asks that
//! authority over gRPC. Everything is driven through gRPC clients only: spends larger than a
//! first slice, parallel spends that drain the account exactly, grants that are not effective
//! yet, balances that equal the ledger after reconciliation, a retried Authorize, reflection,
//! the Envoy adapter, and cached mode. The embedded node's twin is `account_answer.rs`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::Entry;
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::Code;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient;
use envoy_types::pb::envoy::service::ratelimit::v3::RateLimitRequest;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tollgate_authority::{Authority, AuthoritySettings, StateStore, SystemClock};
use tollgate_authority_service::auth::{key_digest, KeyEntry, KeyRing, Scope};
use tollgate_authority_service::server::serve_authority;
use tollgate_core::RegionId;
use tollgate_edge::coordination::AuthorityClient;
use tollgate_edge::metrics::Metrics;
use tollgate_edge::server::{serve_grpc, ServeLimits};
use tollgate_edge::{EdgeSettings, Engine};
use tollgate_proto::pb;
use tollgate_region::{RedisRegionStore, RETAIN_MS_DEFAULT};
use tollgate_testkit::RedisServer;
use tonic::transport::Channel;
use tonic_reflection::pb::v1;

/// Admin on the authority; the edge's cold path uses it too (Coordination needs `admin`).
const ADMIN_KEY: &str = "answer-redis-admin-key";
/// Enforcement and the Envoy adapter on the edge.
const ENFORCE_KEY: &str = "answer-redis-enforce-key";
const REGION: &str = "eu";
const KEY_PREFIX: &str = "tg:answer";
/// How long a listener may take to accept connections.
const LISTEN_WITHIN_MS: u64 = 30_000;
/// How long the authority's background loop (every 200 ms) may take to reconcile.
const RECONCILED_WITHIN_MS: u64 = 20_000;

type Admin = pb::admin_client::AdminClient<Channel>;
type Edge = pb::enforcement_client::EnforcementClient<Channel>;

/// A redis-server, an authority over gRPC and an edge over gRPC on that Redis, with feature
/// `chat` priced at 1 credit per message. The servers end when it is dropped.
struct Stack {
    authority: Channel,
    edge: Channel,
    edge_address: SocketAddr,
    tasks: Vec<JoinHandle<()>>,
    // Dropped last: the servers above use them.
    _dir: tempfile::TempDir,
    _redis: RedisServer,
}

impl Drop for Stack {
    fn drop(&mut self) {
        self.tasks.iter().for_each(JoinHandle::abort);
    }
}

impl Stack {
    async fn start() -> Stack {
        let redis = RedisServer::start().expect("a redis-server for the test");
        let dir = tempfile::tempdir().unwrap();
        let region = RegionId::new(REGION).unwrap();
        let mut tasks = Vec::new();

        // The authority: SQLite ledger and state, the region's Redis, Admin and Coordination.
        let store = |url: String| async move {
            Arc::new(
                RedisRegionStore::connect(&url, KEY_PREFIX, RETAIN_MS_DEFAULT)
                    .await
                    .expect("the regional Redis"),
            )
        };
        let ledger = tollgate_authority_service::open_ledger(&format!(
            "sqlite://{}",
            dir.path().join("ledger.db").display()
        ))
        .await
        .unwrap();
        let state = StateStore::connect(&format!(
            "sqlite://{}",
            dir.path().join("authority.db").display()
        ))
        .await
        .unwrap();
        let authority = Arc::new(Authority::new(
            Arc::clone(&ledger),
            state,
            BTreeMap::from([(region.clone(), store(redis.url()).await)]),
            Arc::new(SystemClock),
            AuthoritySettings::default(),
        ));
        let admin_keys = Arc::new(KeyRing::new(vec![KeyEntry {
            name: "ops".into(),
            digest: key_digest(ADMIN_KEY),
            scope: Scope::Admin,
        }]));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let authority_address = listener.local_addr().unwrap();
        tasks.push(tokio::spawn(async move {
            let serving = serve_authority(
                listener,
                ledger,
                admin_keys,
                authority,
                Arc::new(SystemClock),
                std::future::pending(),
            );
            if let Err(error) = serving.await {
                panic!("the authority stopped: {error}");
            }
        }));
        let authority_channel = connect(authority_address).await;
        with_chat_at_one_credit(&mut Admin::new(authority_channel.clone())).await;

        // The edge, started after the price book is in the region so it loads it at start.
        let allocator = AuthorityClient::new(
            &format!("http://{authority_address}"),
            region.clone(),
            Some(ADMIN_KEY),
            "edge-answer".into(),
        )
        .unwrap();
        let engine = Arc::new(
            Engine::new(
                store(redis.url()).await,
                EdgeSettings::new(region),
                Arc::new(tollgate_edge::SystemClock),
            )
            .with_allocator(Arc::new(allocator)),
        );
        tasks.extend(engine.start().await);
        let enforce_keys = Arc::new(KeyRing::new(vec![KeyEntry {
            name: "checkout".into(),
            digest: key_digest(ENFORCE_KEY),
            scope: Scope::Enforce,
        }]));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let edge_address = listener.local_addr().unwrap();
        tasks.push(tokio::spawn(async move {
            let serving = serve_grpc(
                listener,
                engine,
                Arc::new(Metrics::new().unwrap()),
                enforce_keys,
                ServeLimits::default(),
                std::future::pending(),
            );
            if let Err(error) = serving.await {
                panic!("the edge stopped: {error}");
            }
        }));
        let edge = connect(edge_address).await;
        Stack {
            authority: authority_channel,
            edge,
            edge_address,
            tasks,
            _dir: dir,
            _redis: redis,
        }
    }

    fn admin(&self) -> Admin {
        Admin::new(self.authority.clone())
    }

    fn edge(&self) -> Edge {
        Edge::new(self.edge.clone())
    }

    /// An account with one purchase grant (effective now, never expiring) of `amount`.
    async fn account_with(&self, account: &str, amount: &str) {
        let mut admin = self.admin();
        create_account(&mut admin, account).await;
        grant(&mut admin, account, "g1", amount).await;
    }
}

async fn connect(address: SocketAddr) -> Channel {
    let deadline = tokio::time::Instant::now() + Duration::from_millis(LISTEN_WITHIN_MS);
    loop {
        match Channel::from_shared(format!("http://{address}"))
            .unwrap()
            .connect()
            .await
        {
            Ok(channel) => return channel,
            Err(error) if tokio::time::Instant::now() > deadline => {
                panic!("{address} did not listen: {error}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// A request carrying `key`.
fn keyed<T>(message: T, key: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {key}").parse().unwrap());
    request
}

fn admin_request<T>(message: T) -> tonic::Request<T> {
    keyed(message, ADMIN_KEY)
}

fn request<T>(message: T) -> tonic::Request<T> {
    keyed(message, ENFORCE_KEY)
}

fn timestamp(seconds: i64) -> prost_types::Timestamp {
    prost_types::Timestamp { seconds, nanos: 0 }
}

fn now_seconds() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// Feature `chat` at 1 credit per message.
async fn with_chat_at_one_credit(admin: &mut Admin) {
    admin
        .define_feature(admin_request(pb::DefineFeatureRequest {
            idempotency_key: "feature.chat".into(),
            feature: Some(pb::Feature {
                feature: "chat".into(),
                unit: "message".into(),
                description: "one chat message".into(),
            }),
        }))
        .await
        .unwrap();
    admin
        .publish_price_book_version(admin_request(pb::PublishPriceBookVersionRequest {
            idempotency_key: "prices.1".into(),
            version: Some(pb::PriceBookVersion {
                version: 1,
                effective_from: Some(timestamp(0)),
                default_rates: Some(pb::RateTable {
                    rates: [("chat".to_owned(), "1".to_owned())].into(),
                }),
                ..pb::PriceBookVersion::default()
            }),
        }))
        .await
        .unwrap();
}

async fn create_account(admin: &mut Admin, account: &str) {
    admin
        .create_account(admin_request(pb::CreateAccountRequest {
            idempotency_key: format!("account.{account}"),
            account_id: account.into(),
            ..pb::CreateAccountRequest::default()
        }))
        .await
        .unwrap();
}

/// A grant effective when issued, never expiring, at the source's default priority.
async fn grant(admin: &mut Admin, account: &str, grant_id: &str, amount: &str) {
    admin
        .issue_grant(admin_request(pb::IssueGrantRequest {
            idempotency_key: format!("grant.{account}.{grant_id}"),
            account_id: account.into(),
            grant_id: grant_id.into(),
            amount: amount.into(),
            source: pb::GrantSource::Purchase.into(),
            ..pb::IssueGrantRequest::default()
        }))
        .await
        .unwrap();
}

fn cost(credits: &str) -> Option<pb::Usage> {
    Some(pb::Usage {
        feature: "chat".into(),
        amount: Some(pb::usage::Amount::Cost(credits.into())),
    })
}

async fn debit(
    edge: &mut Edge,
    account: &str,
    key: &str,
    credits: &str,
    mode: pb::EnforcementMode,
) -> pb::debit_reply::Outcome {
    edge.debit(request(pb::DebitRequest {
        idempotency_key: key.into(),
        account_id: account.into(),
        usage: cost(credits),
        mode: mode.into(),
        ..pb::DebitRequest::default()
    }))
    .await
    .unwrap()
    .into_inner()
    .outcome
    .expect("a debit outcome")
}

fn debited(outcome: pb::debit_reply::Outcome) -> pb::Debited {
    match outcome {
        pb::debit_reply::Outcome::Debited(debited) => debited,
        pb::debit_reply::Outcome::Refused(refused) => panic!("refused: {refused:?}"),
    }
}

fn authorize(account: &str, key: &str, credits: &str) -> pb::AuthorizeRequest {
    pb::AuthorizeRequest {
        idempotency_key: key.into(),
        account_id: account.into(),
        usage: cost(credits),
        ttl_seconds: 300,
        ..pb::AuthorizeRequest::default()
    }
}

fn authorized(reply: pb::AuthorizeReply) -> pb::Authorized {
    match reply.outcome {
        Some(pb::authorize_reply::Outcome::Authorized(authorized)) => authorized,
        other => panic!("not authorized: {other:?}"),
    }
}

async fn edge_balance(edge: &mut Edge, account: &str) -> pb::GetBalanceReply {
    edge.get_balance(request(pb::GetBalanceRequest {
        account_id: account.into(),
        ..pb::GetBalanceRequest::default()
    }))
    .await
    .unwrap()
    .into_inner()
}

fn balance_of(reply: &pb::GetBalanceReply) -> &str {
    reply.balance.as_ref().expect("a balance").balance.as_str()
}

async fn ledger_balance(admin: &mut Admin, account: &str) -> String {
    admin
        .get_balance(admin_request(pb::AdminGetBalanceRequest {
            account_id: account.into(),
        }))
        .await
        .unwrap()
        .into_inner()
        .balance
        .expect("a balance")
        .balance
}

/// `count` concurrent debits of 1 credit; answers (allowed, refused insufficient, other).
async fn drain(
    stack: &Stack,
    account: &str,
    count: usize,
    mode: pb::EnforcementMode,
) -> (usize, usize, Vec<String>) {
    let tasks: Vec<_> = (0..count)
        .map(|n| {
            let mut edge = stack.edge();
            let account = account.to_owned();
            tokio::spawn(async move {
                debit(&mut edge, &account, &format!("drain.{n}"), "1", mode).await
            })
        })
        .collect();
    let (mut allowed, mut insufficient, mut other) = (0, 0, Vec::new());
    for task in tasks {
        match task.await.unwrap() {
            pb::debit_reply::Outcome::Debited(_) => allowed += 1,
            pb::debit_reply::Outcome::Refused(refused)
                if refused.code == pb::RefusalCode::InsufficientCredits as i32 =>
            {
                insufficient += 1
            }
            pb::debit_reply::Outcome::Refused(refused) => other.push(format!("{refused:?}")),
        }
    }
    (allowed, insufficient, other)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_a_spend_larger_than_the_first_slice_is_allowed() {
    let stack = Stack::start().await;
    stack.account_with("big", "1000").await;

    let outcome = debit(
        &mut stack.edge(),
        "big",
        "d1",
        "50",
        pb::EnforcementMode::Strict,
    )
    .await;
    assert_eq!(debited(outcome).balance_after, "950");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_parallel_debits_spend_exactly_what_the_account_holds() {
    let stack = Stack::start().await;
    stack.account_with("small", "100").await;

    let (allowed, insufficient, other) =
        drain(&stack, "small", 200, pb::EnforcementMode::Strict).await;
    let balance = edge_balance(&mut stack.edge(), "small").await;
    assert_eq!(
        (allowed, insufficient, other.len(), balance_of(&balance)),
        (100, 100, 0, "0"),
        "(allowed, insufficient, other refusals, GetBalance.balance); other: {other:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_a_future_grant_with_a_better_priority_blocks_nothing() {
    let stack = Stack::start().await;
    let mut admin = stack.admin();
    create_account(&mut admin, "later").await;
    let issue = |grant_id: &str, priority: u32, effective_at: Option<i64>| pb::IssueGrantRequest {
        idempotency_key: format!("grant.{grant_id}"),
        account_id: "later".into(),
        grant_id: grant_id.into(),
        amount: "100".into(),
        source: pb::GrantSource::Purchase.into(),
        priority: Some(priority),
        effective_at: effective_at.map(timestamp),
        ..pb::IssueGrantRequest::default()
    };
    admin
        .issue_grant(admin_request(issue("today", 10, None)))
        .await
        .unwrap();
    admin
        .issue_grant(admin_request(issue(
            "tomorrow",
            0,
            Some(now_seconds() + 86_400),
        )))
        .await
        .unwrap();

    let mut edge = stack.edge();
    let outcome = debit(&mut edge, "later", "d1", "30", pb::EnforcementMode::Strict).await;
    let debited = debited(outcome);
    let balance = edge_balance(&mut edge, "later").await;
    let quote = edge
        .quote(request(pb::QuoteRequest {
            account_id: "later".into(),
            usage: cost("50"),
        }))
        .await
        .unwrap()
        .into_inner();
    let draws: Vec<(&str, &str)> = debited
        .draws
        .iter()
        .map(|draw| (draw.grant_id.as_str(), draw.amount.as_str()))
        .collect();
    assert_eq!(
        (
            debited.balance_after.as_str(),
            draws,
            balance_of(&balance),
            quote.affordable,
            quote.available.as_str(),
        ),
        ("70", vec![("today", "30")], "70", true, "70"),
        "(balance_after, draws, GetBalance.balance, Quote.affordable, Quote.available); \
         GetBalance {balance:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_balance_after_and_get_balance_equal_the_ledger_after_reconciliation() {
    let stack = Stack::start().await;
    stack.account_with("books", "100").await;
    let mut edge = stack.edge();
    let strict = pb::EnforcementMode::Strict;

    // The first spend is larger than a first slice would be.
    let mut replies = Vec::new();
    for (key, credits) in [("d1", "50"), ("d2", "5"), ("d3", "2.5")] {
        replies.push(debited(debit(&mut edge, "books", key, credits, strict).await).balance_after);
    }
    assert_eq!(replies, ["50", "45", "42.5"], "each Debit's balance_after");
    let first = authorized(
        edge.authorize(request(authorize("books", "h1", "20")))
            .await
            .unwrap()
            .into_inner(),
    );
    assert_eq!(first.balance_after, "22.5");
    let captured = match edge
        .capture(request(pb::CaptureRequest {
            idempotency_key: "c1".into(),
            account_id: "books".into(),
            hold_id: first.hold_id.clone(),
            amount: "15".into(),
            ..pb::CaptureRequest::default()
        }))
        .await
        .unwrap()
        .into_inner()
        .outcome
    {
        Some(pb::capture_reply::Outcome::Captured(captured)) => captured,
        other => panic!("not captured: {other:?}"),
    };
    assert_eq!(
        (
            captured.captured.as_str(),
            captured.released.as_str(),
            captured.balance_after.as_str()
        ),
        ("15", "5", "27.5")
    );
    let second = authorized(
        edge.authorize(request(authorize("books", "h2", "7")))
            .await
            .unwrap()
            .into_inner(),
    );
    assert_eq!(second.balance_after, "20.5");
    let released = match edge
        .release(request(pb::ReleaseRequest {
            idempotency_key: "r1".into(),
            account_id: "books".into(),
            hold_id: second.hold_id.clone(),
            ..pb::ReleaseRequest::default()
        }))
        .await
        .unwrap()
        .into_inner()
        .outcome
    {
        Some(pb::release_reply::Outcome::Released(released)) => released,
        other => panic!("not released: {other:?}"),
    };
    assert_eq!(released.released, "7");

    // 100 - 50 - 5 - 2.5 - 15, once the authority read the region's usage stream.
    let expected = "27.5";
    let mut admin = stack.admin();
    let deadline = tokio::time::Instant::now() + Duration::from_millis(RECONCILED_WITHIN_MS);
    let ledger = loop {
        let ledger = ledger_balance(&mut admin, "books").await;
        if ledger == expected || tokio::time::Instant::now() > deadline {
            break ledger;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(ledger, expected, "the ledger after reconciliation");
    assert_eq!(
        released.balance_after, ledger,
        "the last reply's balance_after"
    );
    let balance = edge_balance(&mut edge, "books").await;
    assert_eq!(
        (balance_of(&balance), balance.held.as_str()),
        (ledger.as_str(), "0"),
        "Enforcement GetBalance (balance, held)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_a_retried_authorize_returns_the_same_hold() {
    let stack = Stack::start().await;
    stack.account_with("retry", "1000").await;
    let mut edge = stack.edge();

    let first = authorized(
        edge.authorize(request(authorize("retry", "h1", "50")))
            .await
            .unwrap()
            .into_inner(),
    );
    // The same key and the same request, as a client retries after a lost reply.
    let again = authorized(
        edge.authorize(request(authorize("retry", "h1", "50")))
            .await
            .unwrap()
            .into_inner(),
    );
    let balance = edge_balance(&mut edge, "retry").await;
    assert!(!first.hold_id.is_empty(), "a hold id: {first:?}");
    assert_eq!(
        (
            again.hold_id.as_str(),
            &again.expires_at,
            again.replayed,
            first.replayed
        ),
        (first.hold_id.as_str(), &first.expires_at, true, false),
        "(hold id, expiry, replayed) of the retry, and the first call not replayed"
    );
    assert_eq!(
        (
            first.balance_after.as_str(),
            again.balance_after.as_str(),
            balance_of(&balance),
            balance.held.as_str(),
        ),
        ("950", "950", "950", "50"),
        "(first balance_after, retry balance_after, GetBalance balance, held): \
         one hold set aside once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_reflection_lists_the_envoy_rate_limit_service() {
    let stack = Stack::start().await;
    let mut reflection = v1::server_reflection_client::ServerReflectionClient::new(
        connect(stack.edge_address).await,
    );
    let ask = v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(v1::server_reflection_request::MessageRequest::ListServices(
            String::new(),
        )),
    };
    let reply = reflection
        .server_reflection_info(tokio_stream::iter([ask]))
        .await
        .unwrap()
        .into_inner()
        .message()
        .await
        .unwrap()
        .expect("one reply");
    let Some(v1::server_reflection_response::MessageResponse::ListServicesResponse(list)) =
        reply.message_response
    else {
        panic!("a service list: {reply:?}");
    };
    let listed: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for service in [
        "envoy.service.ratelimit.v3.RateLimitService",
        "tollgate.v1.Enforcement",
        "grpc.health.v1.Health",
    ] {
        assert!(
            listed.iter().any(|name| name == service),
            "{service}: {listed:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_the_envoy_adapter_allows_a_call_the_account_can_pay() {
    let stack = Stack::start().await;
    stack.account_with("gateway", "1000").await;

    let mut envoy = RateLimitServiceClient::new(stack.edge.clone());
    let entry = |key: &str, value: &str| Entry {
        key: key.into(),
        value: value.into(),
    };
    let reply = envoy
        .should_rate_limit(request(RateLimitRequest {
            domain: "tollgate".into(),
            descriptors: vec![RateLimitDescriptor {
                entries: vec![entry("account", "gateway"), entry("feature", "chat")],
                hits_addend: Some(envoy_types::pb::google::protobuf::UInt64Value { value: 50 }),
                ..RateLimitDescriptor::default()
            }],
            hits_addend: 0,
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.overall_code, Code::Ok as i32, "{reply:?}");
    let note = reply
        .response_headers_to_add
        .iter()
        .find(|header| header.key == "x-tollgate")
        .unwrap_or_else(|| panic!("no x-tollgate header: {reply:?}"));
    assert!(
        note.value
            .split(';')
            .any(|part| part.trim() == "balance=950"),
        "{}",
        note.value
    );
    let balance = edge_balance(&mut stack.edge(), "gateway").await;
    assert_eq!(balance_of(&balance), "950", "GetBalance after the call");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_cached_mode_spends_what_the_account_holds() {
    let stack = Stack::start().await;
    let cached = pb::EnforcementMode::Cached;
    stack.account_with("cached-big", "1000").await;
    stack.account_with("cached-small", "100").await;

    let outcome = debit(&mut stack.edge(), "cached-big", "d1", "50", cached).await;
    let balance_after = debited(outcome).balance_after;
    let (allowed, insufficient, other) = drain(&stack, "cached-small", 200, cached).await;
    let balance = edge_balance(&mut stack.edge(), "cached-small").await;

    // Both halves observed before either is judged, so a failure reports all the figures.
    assert_eq!(
        (
            balance_after.as_str(),
            allowed,
            insufficient,
            other.len(),
            balance_of(&balance),
        ),
        ("950", 100, 100, 0, "0"),
        "(balance_after of 50 from 1000, allowed, insufficient, other refusals, balance); \
         other: {other:?}; GetBalance {balance:?}"
    );
}
