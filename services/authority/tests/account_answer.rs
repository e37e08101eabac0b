//! The edge answers for the account, not for the region's slice: the real `tollgate-authority
//! dev` binary over gRPC, with spends larger than a first slice, parallel spends that drain
//! the account exactly, grants that are not effective yet, balances that equal the ledger after
//! reconciliation, the Envoy adapter, and cached mode.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use envoy_types::pb::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::Entry;
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::Code;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient;
use envoy_types::pb::envoy::service::ratelimit::v3::RateLimitRequest;
use tollgate_proto::pb;
use tollgate_testkit::process::free_port;
use tonic::transport::Channel;

const KEY: &str = "account-answer-key";
/// How long the node may take to listen.
const LISTEN_WITHIN_MS: u64 = 30_000;
/// How long the background loop (every 200 ms) may take to reconcile.
const RECONCILED_WITHIN_MS: u64 = 10_000;

type Admin = pb::admin_client::AdminClient<Channel>;
type Edge = pb::enforcement_client::EnforcementClient<Channel>;

/// The `dev` binary on free ports and a temporary data directory; killed on drop.
struct Node {
    child: Child,
    channel: Channel,
    _dir: tempfile::TempDir,
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Node {
    async fn start() -> Node {
        let dir = tempfile::tempdir().unwrap();
        let listen = format!("127.0.0.1:{}", free_port().unwrap());
        let http = format!("127.0.0.1:{}", free_port().unwrap());
        let mut child = Command::new(env!("CARGO_BIN_EXE_tollgate-authority"))
            .args(["dev", "--listen", &listen, "--http-listen", &http, "--data"])
            .arg(dir.path())
            .env("TOLLGATE_DEV_API_KEY", KEY)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_millis(LISTEN_WITHIN_MS);
        let channel = loop {
            if let Some(status) = child.try_wait().unwrap() {
                panic!("the node exited before listening: {status}");
            }
            match Channel::from_shared(format!("http://{listen}"))
                .unwrap()
                .connect()
                .await
            {
                Ok(channel) => break channel,
                Err(error) if tokio::time::Instant::now() > deadline => {
                    let _ = child.kill();
                    panic!("the node did not listen: {error}")
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        };
        Node {
            child,
            channel,
            _dir: dir,
        }
    }

    fn admin(&self) -> Admin {
        Admin::new(self.channel.clone())
    }

    fn edge(&self) -> Edge {
        Edge::new(self.channel.clone())
    }

    /// Feature `chat` at 1 credit per message.
    async fn with_chat_at_one_credit(&self) {
        let mut admin = self.admin();
        admin
            .define_feature(request(pb::DefineFeatureRequest {
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
            .publish_price_book_version(request(pb::PublishPriceBookVersionRequest {
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
}

/// A request carrying the node's key.
fn request<T>(message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {KEY}").parse().unwrap());
    request
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

async fn create_account(admin: &mut Admin, account: &str) {
    admin
        .create_account(request(pb::CreateAccountRequest {
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
        .issue_grant(request(pb::IssueGrantRequest {
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

async fn edge_balance(edge: &mut Edge, account: &str) -> pb::GetBalanceReply {
    edge.get_balance(request(pb::GetBalanceRequest {
        account_id: account.into(),
        ..pb::GetBalanceRequest::default()
    }))
    .await
    .unwrap()
    .into_inner()
}

async fn ledger_balance(admin: &mut Admin, account: &str) -> String {
    admin
        .get_balance(request(pb::AdminGetBalanceRequest {
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
    node: &Node,
    account: &str,
    count: usize,
    mode: pb::EnforcementMode,
) -> (usize, usize, Vec<String>) {
    let tasks: Vec<_> = (0..count)
        .map(|n| {
            let mut edge = node.edge();
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
async fn a_spend_larger_than_the_first_slice_is_allowed() {
    let node = Node::start().await;
    node.with_chat_at_one_credit().await;
    let mut admin = node.admin();
    create_account(&mut admin, "big").await;
    grant(&mut admin, "big", "g1", "1000").await;

    let outcome = debit(
        &mut node.edge(),
        "big",
        "d1",
        "50",
        pb::EnforcementMode::Strict,
    )
    .await;
    assert_eq!(debited(outcome).balance_after, "950");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parallel_debits_spend_exactly_what_the_account_holds() {
    let node = Node::start().await;
    node.with_chat_at_one_credit().await;
    let mut admin = node.admin();
    create_account(&mut admin, "small").await;
    grant(&mut admin, "small", "g1", "100").await;

    let (allowed, insufficient, other) =
        drain(&node, "small", 200, pb::EnforcementMode::Strict).await;
    assert_eq!(
        (allowed, insufficient, other.len()),
        (100, 100, 0),
        "{other:?}"
    );
    let balance = edge_balance(&mut node.edge(), "small").await;
    assert_eq!(balance.balance.expect("a balance").balance, "0");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_future_grant_with_a_better_priority_blocks_nothing() {
    let node = Node::start().await;
    node.with_chat_at_one_credit().await;
    let mut admin = node.admin();
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
        .issue_grant(request(issue("a", 10, None)))
        .await
        .unwrap();
    admin
        .issue_grant(request(issue("b", 0, Some(now_seconds() + 86_400))))
        .await
        .unwrap();

    let mut edge = node.edge();
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
    let observed = (
        debited.balance_after.as_str(),
        balance
            .balance
            .as_ref()
            .expect("a balance")
            .balance
            .as_str(),
        quote.affordable,
        quote.available.as_str(),
    );
    assert_eq!(
        observed,
        ("70", "70", true, "70"),
        "(balance_after, GetBalance.balance, Quote.affordable, Quote.available); \
         draws {:?}; GetBalance {balance:?}",
        debited.draws
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn balance_after_and_get_balance_equal_the_ledger_after_reconciliation() {
    let node = Node::start().await;
    node.with_chat_at_one_credit().await;
    let mut admin = node.admin();
    create_account(&mut admin, "books").await;
    grant(&mut admin, "books", "g1", "100").await;
    let mut edge = node.edge();
    let strict = pb::EnforcementMode::Strict;

    for (key, credits) in [("d1", "10"), ("d2", "5"), ("d3", "2.5")] {
        debited(debit(&mut edge, "books", key, credits, strict).await);
    }
    let authorize = |key: &str, credits: &str| pb::AuthorizeRequest {
        idempotency_key: key.into(),
        account_id: "books".into(),
        usage: cost(credits),
        ttl_seconds: 300,
        ..pb::AuthorizeRequest::default()
    };
    let hold = |reply: pb::AuthorizeReply| match reply.outcome {
        Some(pb::authorize_reply::Outcome::Authorized(authorized)) => authorized,
        other => panic!("not authorized: {other:?}"),
    };
    let first = hold(
        edge.authorize(request(authorize("h1", "20")))
            .await
            .unwrap()
            .into_inner(),
    );
    assert_eq!(first.balance_after, "62.5");
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
        (captured.captured.as_str(), captured.released.as_str()),
        ("15", "5")
    );
    assert_eq!(captured.balance_after, "67.5");
    let second = hold(
        edge.authorize(request(authorize("h2", "7")))
            .await
            .unwrap()
            .into_inner(),
    );
    assert_eq!(second.balance_after, "60.5");
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

    // 100 - 10 - 5 - 2.5 - 15.
    let expected = "67.5";
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
        balance.balance.expect("a balance").balance,
        ledger,
        "Enforcement GetBalance"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_envoy_adapter_allows_a_call_the_account_can_pay() {
    let node = Node::start().await;
    node.with_chat_at_one_credit().await;
    let mut admin = node.admin();
    create_account(&mut admin, "gateway").await;
    grant(&mut admin, "gateway", "g1", "1000").await;

    let mut envoy = RateLimitServiceClient::new(node.channel.clone());
    let entry = |key: &str, value: &str| Entry {
        key: key.into(),
        value: value.into(),
    };
    let reply = envoy
        .should_rate_limit(request(RateLimitRequest {
            domain: "tollgate".into(),
            descriptors: vec![RateLimitDescriptor {
                entries: vec![entry("account", "gateway"), entry("feature", "chat")],
                hits_addend: Some(envoy_types::pb::google::protobuf::UInt64Value { value: 20 }),
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
    assert!(note.value.contains("balance=980"), "{}", note.value);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_mode_spends_what_the_account_holds() {
    let node = Node::start().await;
    node.with_chat_at_one_credit().await;
    let mut admin = node.admin();
    let cached = pb::EnforcementMode::Cached;
    create_account(&mut admin, "cached-big").await;
    grant(&mut admin, "cached-big", "g1", "1000").await;
    create_account(&mut admin, "cached-small").await;
    grant(&mut admin, "cached-small", "g1", "100").await;

    let outcome = debit(&mut node.edge(), "cached-big", "d1", "50", cached).await;
    let balance_after = debited(outcome).balance_after;
    let (allowed, insufficient, other) = drain(&node, "cached-small", 200, cached).await;
    let balance = edge_balance(&mut node.edge(), "cached-small").await;

    // Both halves observed before either is judged, so a failure reports all the figures.
    assert_eq!(
        (
            balance_after.as_str(),
            allowed,
            insufficient,
            other.len(),
            balance
                .balance
                .as_ref()
                .expect("a balance")
                .balance
                .as_str(),
        ),
        ("950", 100, 100, 0, "0"),
        "(balance_after of 50 from 1000, allowed, insufficient, other refusals, balance); \
         other: {other:?}; GetBalance {balance:?}"
    );
}
