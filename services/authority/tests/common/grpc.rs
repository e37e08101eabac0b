//! gRPC clients that present a key, and the Admin and Enforcement calls the tests repeat: feature
//! `chat` at 1 credit, accounts, grants, debits, holds and balances; and the assertions both
//! topologies run (cached mode, a retried Authorize).

use std::net::SocketAddr;
use std::time::Duration;

use tollgate_proto::pb;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::service::Interceptor;
use tonic::transport::Channel;
use tonic_reflection::pb::v1;

/// How long a listener may take to accept connections.
pub const LISTEN_WITHIN_MS: u64 = 30_000;

/// Adds `authorization: Bearer <key>` to every call.
#[derive(Clone)]
pub struct Bearer(MetadataValue<Ascii>);

impl Bearer {
    pub fn new(key: &str) -> Bearer {
        Bearer(format!("Bearer {key}").parse().unwrap())
    }
}

impl Interceptor for Bearer {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        request
            .metadata_mut()
            .insert("authorization", self.0.clone());
        Ok(request)
    }
}

pub type Admin = pb::admin_client::AdminClient<InterceptedService<Channel, Bearer>>;
pub type Edge = pb::enforcement_client::EnforcementClient<InterceptedService<Channel, Bearer>>;

/// Admin on `channel`, presenting `key`.
pub fn admin(channel: Channel, key: &str) -> Admin {
    pb::admin_client::AdminClient::with_interceptor(channel, Bearer::new(key))
}

/// Enforcement on `channel`, presenting `key`.
pub fn edge(channel: Channel, key: &str) -> Edge {
    pb::enforcement_client::EnforcementClient::with_interceptor(channel, Bearer::new(key))
}

/// A request carrying `key`.
pub fn keyed<T>(message: T, key: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {key}").parse().unwrap());
    request
}

/// A channel to `address`, retried until it listens (at most `LISTEN_WITHIN_MS`).
pub async fn connect(address: SocketAddr) -> Channel {
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

pub fn timestamp(seconds: i64) -> prost_types::Timestamp {
    prost_types::Timestamp { seconds, nanos: 0 }
}

pub fn now_seconds() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// Feature `chat` (described as `description`) at 1 credit per message, from the epoch.
pub async fn chat_at_one_credit(admin: &mut Admin, description: &str) {
    define_chat(admin, description).await;
    price_chat(admin, "1").await;
}

/// Feature `chat`, counted in messages.
pub async fn define_chat(admin: &mut Admin, description: &str) {
    admin
        .define_feature(pb::DefineFeatureRequest {
            idempotency_key: "feature.chat".into(),
            feature: Some(pb::Feature {
                feature: "chat".into(),
                unit: "message".into(),
                description: description.into(),
            }),
        })
        .await
        .unwrap();
}

/// Price book version 1: `chat` at `rate` credits per message from the epoch.
pub async fn price_chat(admin: &mut Admin, rate: &str) {
    admin
        .publish_price_book_version(pb::PublishPriceBookVersionRequest {
            idempotency_key: "prices.1".into(),
            version: Some(pb::PriceBookVersion {
                version: 1,
                effective_from: Some(timestamp(0)),
                default_rates: Some(pb::RateTable {
                    rates: [("chat".to_owned(), rate.to_owned())].into(),
                }),
                ..pb::PriceBookVersion::default()
            }),
        })
        .await
        .unwrap();
}

pub async fn create_account(admin: &mut Admin, account: &str) {
    admin
        .create_account(pb::CreateAccountRequest {
            idempotency_key: format!("account.{account}"),
            account_id: account.into(),
            ..pb::CreateAccountRequest::default()
        })
        .await
        .unwrap();
}

/// A purchase grant effective when issued, never expiring, at the source's default priority.
pub async fn grant(admin: &mut Admin, account: &str, grant_id: &str, amount: &str) {
    grant_from(admin, account, grant_id, amount, pb::GrantSource::Purchase).await;
}

/// A grant from `source` effective when issued, never expiring, at the source's default
/// priority (promo 30 burns before purchase 50).
pub async fn grant_from(
    admin: &mut Admin,
    account: &str,
    grant_id: &str,
    amount: &str,
    source: pb::GrantSource,
) {
    admin
        .issue_grant(pb::IssueGrantRequest {
            idempotency_key: format!("grant.{account}.{grant_id}"),
            account_id: account.into(),
            grant_id: grant_id.into(),
            amount: amount.into(),
            source: source.into(),
            ..pb::IssueGrantRequest::default()
        })
        .await
        .unwrap();
}

/// A grant of `amount` at `priority`, effective at `effective_at` (seconds) or when issued,
/// never expiring.
pub async fn grant_at(
    admin: &mut Admin,
    account: &str,
    grant_id: &str,
    amount: &str,
    priority: u32,
    effective_at: Option<i64>,
) {
    admin
        .issue_grant(pb::IssueGrantRequest {
            idempotency_key: format!("grant.{account}.{grant_id}"),
            account_id: account.into(),
            grant_id: grant_id.into(),
            amount: amount.into(),
            source: pb::GrantSource::Purchase.into(),
            priority: Some(priority),
            effective_at: effective_at.map(timestamp),
            ..pb::IssueGrantRequest::default()
        })
        .await
        .unwrap();
}

/// Admin `GetBalance` of `account`: the account's balance, its parts and the ledger's sum.
pub async fn admin_balance(admin: &mut Admin, account: &str) -> pb::AdminGetBalanceReply {
    admin
        .get_balance(pb::AdminGetBalanceRequest {
            account_id: account.into(),
        })
        .await
        .unwrap()
        .into_inner()
}

/// The ledger's balance of `account` (its sum of open grants less debt: Admin `GetBalance`'s
/// `ledger_balance`).
pub async fn ledger_balance(admin: &mut Admin, account: &str) -> String {
    admin_balance(admin, account).await.ledger_balance
}

/// The ledger's balance of `account`, polled every 100 ms until it is `expected` or
/// `within_ms` passed (the background loop reconciles); answers the last balance read.
pub async fn reconciled_ledger_balance(
    admin: &mut Admin,
    account: &str,
    expected: &str,
    within_ms: u64,
) -> String {
    let deadline = tokio::time::Instant::now() + Duration::from_millis(within_ms);
    loop {
        let ledger = ledger_balance(admin, account).await;
        if ledger == expected || tokio::time::Instant::now() > deadline {
            return ledger;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// What the ledger says each grant of `account` has left, as (grant, remaining), in the order
/// Admin `ListGrants` answers them.
pub async fn remaining_per_grant(admin: &mut Admin, account: &str) -> Vec<(String, String)> {
    admin
        .list_grants(pb::ListGrantsRequest {
            account_id: account.into(),
            ..pb::ListGrantsRequest::default()
        })
        .await
        .unwrap()
        .into_inner()
        .grants
        .into_iter()
        .map(|grant| (grant.grant_id, grant.remaining))
        .collect()
}

/// `credits` of feature `chat`.
pub fn cost(credits: &str) -> Option<pb::Usage> {
    Some(pb::Usage {
        feature: "chat".into(),
        amount: Some(pb::usage::Amount::Cost(credits.into())),
    })
}

pub async fn debit(
    edge: &mut Edge,
    account: &str,
    key: &str,
    credits: &str,
    mode: pb::EnforcementMode,
) -> pb::debit_reply::Outcome {
    edge.debit(pb::DebitRequest {
        idempotency_key: key.into(),
        account_id: account.into(),
        usage: cost(credits),
        mode: mode.into(),
        ..pb::DebitRequest::default()
    })
    .await
    .unwrap()
    .into_inner()
    .outcome
    .expect("a debit outcome")
}

pub fn debited(outcome: pb::debit_reply::Outcome) -> pb::Debited {
    match outcome {
        pb::debit_reply::Outcome::Debited(debited) => debited,
        pb::debit_reply::Outcome::Refused(refused) => panic!("refused: {refused:?}"),
    }
}

/// The debit's draws as (grant, credits).
pub fn draws(debited: &pb::Debited) -> Vec<(&str, &str)> {
    debited
        .draws
        .iter()
        .map(|draw| (draw.grant_id.as_str(), draw.amount.as_str()))
        .collect()
}

/// The refusal's code, or a panic naming the debit that was allowed.
pub fn refusal_code(outcome: pb::debit_reply::Outcome) -> pb::RefusalCode {
    match outcome {
        pb::debit_reply::Outcome::Refused(refused) => refused.code(),
        pb::debit_reply::Outcome::Debited(debited) => panic!("debited: {debited:?}"),
    }
}

/// A hold of `credits` for 300 s.
pub fn authorize(account: &str, key: &str, credits: &str) -> pb::AuthorizeRequest {
    pb::AuthorizeRequest {
        idempotency_key: key.into(),
        account_id: account.into(),
        usage: cost(credits),
        ttl_seconds: 300,
        ..pb::AuthorizeRequest::default()
    }
}

pub fn authorized(reply: pb::AuthorizeReply) -> pb::Authorized {
    match reply.outcome {
        Some(pb::authorize_reply::Outcome::Authorized(authorized)) => authorized,
        other => panic!("not authorized: {other:?}"),
    }
}

/// Authorizes a hold of `credits` (idempotency key `key`) and answers it.
pub async fn hold(edge: &mut Edge, account: &str, key: &str, credits: &str) -> pb::Authorized {
    let reply = edge
        .authorize(authorize(account, key, credits))
        .await
        .unwrap()
        .into_inner();
    authorized(reply)
}

/// Captures `amount` of `hold_id` (idempotency key `key`).
pub async fn capture(
    edge: &mut Edge,
    account: &str,
    key: &str,
    hold_id: &str,
    amount: &str,
) -> pb::Captured {
    let reply = edge
        .capture(pb::CaptureRequest {
            idempotency_key: key.into(),
            account_id: account.into(),
            hold_id: hold_id.into(),
            amount: amount.into(),
            ..pb::CaptureRequest::default()
        })
        .await
        .unwrap()
        .into_inner();
    match reply.outcome {
        Some(pb::capture_reply::Outcome::Captured(captured)) => captured,
        other => panic!("not captured: {other:?}"),
    }
}

/// Releases `hold_id` (idempotency key `key`).
pub async fn release(edge: &mut Edge, account: &str, key: &str, hold_id: &str) -> pb::Released {
    let reply = edge
        .release(pb::ReleaseRequest {
            idempotency_key: key.into(),
            account_id: account.into(),
            hold_id: hold_id.into(),
            ..pb::ReleaseRequest::default()
        })
        .await
        .unwrap()
        .into_inner();
    match reply.outcome {
        Some(pb::release_reply::Outcome::Released(released)) => released,
        other => panic!("not released: {other:?}"),
    }
}

/// Enforcement's `GetBalance` of `account`.
pub async fn edge_balance(edge: &mut Edge, account: &str) -> pb::GetBalanceReply {
    edge.get_balance(pb::GetBalanceRequest {
        account_id: account.into(),
        ..pb::GetBalanceRequest::default()
    })
    .await
    .unwrap()
    .into_inner()
}

/// Enforcement's `Quote` of `credits` for `account`.
pub async fn quote(edge: &mut Edge, account: &str, credits: &str) -> pb::QuoteReply {
    edge.quote(pb::QuoteRequest {
        account_id: account.into(),
        usage: cost(credits),
    })
    .await
    .unwrap()
    .into_inner()
}

pub fn balance_of(reply: &pb::GetBalanceReply) -> &str {
    reply.balance.as_ref().expect("a balance").balance.as_str()
}

/// `count` concurrent debits of 1 credit, each on its own clone of `edge`; answers (allowed,
/// refused insufficient, other refusals).
pub async fn drain(
    edge: &Edge,
    account: &str,
    count: usize,
    mode: pb::EnforcementMode,
) -> (usize, usize, Vec<String>) {
    let tasks: Vec<_> = (0..count)
        .map(|n| {
            let mut edge = edge.clone();
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

/// Cached mode answers for the account: on `cached-big` (1,000 credits) a 50-credit debit
/// leaves 950, and on `cached-small` (100 credits) 200 concurrent debits of 1 allow exactly 100
/// and leave 0. Both accounts are set up by the caller, on whatever topology `edge` reaches.
pub async fn assert_cached_mode_spends_what_the_account_holds(edge: impl Fn() -> Edge) {
    let cached = pb::EnforcementMode::Cached;
    let outcome = debit(&mut edge(), "cached-big", "d1", "50", cached).await;
    let balance_after = debited(outcome).balance_after;
    let (allowed, insufficient, other) = drain(&edge(), "cached-small", 200, cached).await;
    let balance = edge_balance(&mut edge(), "cached-small").await;

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

/// A retried Authorize answers the first hold and sets nothing more aside. On `retry` (1,000
/// credits, set up by the caller on whatever topology `edge` reaches) a hold of 50 sent again
/// later under the same key answers the first hold id and expiry, marked replayed; a hold of 60
/// under that key is an idempotency conflict (ALREADY_EXISTS); and the balance shows one hold
/// of 50 throughout.
pub async fn assert_a_retried_authorize_returns_the_same_hold(edge: impl Fn() -> Edge) {
    let mut edge = edge();
    let first = hold(&mut edge, "retry", "h1", "50").await;
    // Instants are kept to the millisecond: a retry a few milliseconds later would have a later
    // expiry if it were authorized afresh.
    tokio::time::sleep(Duration::from_millis(10)).await;
    // The same key and the same request, as a client retries after a lost reply.
    let again = hold(&mut edge, "retry", "h1", "50").await;
    // The same key with another request: a client bug, not a retry.
    let conflict = edge.authorize(authorize("retry", "h1", "60")).await;
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
    match conflict {
        Err(status) => assert_eq!(
            status.code(),
            tonic::Code::AlreadyExists,
            "the same key with 60 credits: {status:?}"
        ),
        Ok(reply) => panic!("the same key with 60 credits answered {reply:?}"),
    }
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

/// Asks v1 reflection on `channel` one question; answers its one reply.
pub async fn ask_reflection(
    channel: Channel,
    message: v1::server_reflection_request::MessageRequest,
) -> v1::ServerReflectionResponse {
    let request = v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(message),
    };
    v1::server_reflection_client::ServerReflectionClient::new(channel)
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner()
        .message()
        .await
        .unwrap()
        .expect("one reply")
}

/// The names of the services v1 reflection on `channel` lists.
pub async fn reflected_services(channel: Channel) -> Vec<String> {
    let reply = ask_reflection(
        channel,
        v1::server_reflection_request::MessageRequest::ListServices(String::new()),
    )
    .await;
    let Some(v1::server_reflection_response::MessageResponse::ListServicesResponse(list)) =
        reply.message_response
    else {
        panic!("a v1 service list: {reply:?}");
    };
    list.service.into_iter().map(|s| s.name).collect()
}
