//! gRPC clients that present a key, and the Admin and Enforcement calls the tests repeat: feature
//! `chat` at 1 credit, accounts, grants, debits, holds and balances; and the assertions both
//! topologies run (cached mode, a retried Authorize, the Envoy adapter, Reverse, overdraft).

use std::net::SocketAddr;
use std::time::Duration;

use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::Code as EnvoyCode;
use envoy_types::pb::envoy::service::ratelimit::v3::RateLimitResponse;
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
    debit_usage(edge, account, key, cost(credits), mode).await
}

/// Debits `usage` under `key` and answers the outcome.
async fn debit_usage(
    edge: &mut Edge,
    account: &str,
    key: &str,
    usage: Option<pb::Usage>,
    mode: pb::EnforcementMode,
) -> pb::debit_reply::Outcome {
    edge.debit(pb::DebitRequest {
        idempotency_key: key.into(),
        account_id: account.into(),
        usage,
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

/// `quantity` messages of feature `chat`, priced by the price book.
fn messages(quantity: &str) -> Option<pb::Usage> {
    Some(pb::Usage {
        feature: "chat".into(),
        amount: Some(pb::usage::Amount::Quantity(quantity.into())),
    })
}

/// A debit of `quantity` messages under `key`; panics on a refusal.
async fn debit_messages(
    edge: &mut Edge,
    account: &str,
    key: &str,
    quantity: &str,
    mode: pb::EnforcementMode,
) -> pb::Debited {
    debited(debit_usage(edge, account, key, messages(quantity), mode).await)
}

/// How long the edge may take to price by a newly published version (it reloads within 1 s).
const REPRICED_WITHIN_MS: u64 = 10_000;

/// A debit retried after the price changed is the same request: its quantity is what the caller
/// asked for, the price is the system's answer. On `repriced` (100 credits, `chat` at 1 credit
/// from price book version 1, both set up by the caller), 3 messages are debited in strict and
/// in cached mode; version 2 then prices `chat` at 2 credits; the retries of both keys answer
/// the first debit (3 credits at version 1, replayed) and charge nothing more, while a new key
/// pays the new price. The account ends at 100 - 3 - 3 - 2 = 92, in the edge and, once
/// reconciled, in the ledger.
pub async fn assert_a_retried_quantity_debit_answers_at_its_first_price(
    admin: &mut Admin,
    edge: impl Fn() -> Edge,
    reconciled_within_ms: u64,
) {
    let (strict, cached) = (pb::EnforcementMode::Strict, pb::EnforcementMode::Cached);
    let first_strict = debit_messages(&mut edge(), "repriced", "q.strict", "3", strict).await;
    let first_cached = debit_messages(&mut edge(), "repriced", "q.cached", "3", cached).await;

    admin
        .publish_price_book_version(pb::PublishPriceBookVersionRequest {
            idempotency_key: "prices.2".into(),
            version: Some(pb::PriceBookVersion {
                version: 2,
                effective_from: Some(timestamp(now_seconds())),
                default_rates: Some(pb::RateTable {
                    rates: [("chat".to_owned(), "2".to_owned())].into(),
                }),
                ..pb::PriceBookVersion::default()
            }),
        })
        .await
        .unwrap();
    // A fresh key shows when the edge prices by version 2.
    let deadline = tokio::time::Instant::now() + Duration::from_millis(REPRICED_WITHIN_MS);
    let fresh = loop {
        let probe = pb::QuoteRequest {
            account_id: "repriced".into(),
            usage: messages("1"),
        };
        let quote = edge().quote(probe).await.unwrap().into_inner();
        if quote.priced.as_ref().is_some_and(|p| p.price_version == 2) {
            break debit_messages(&mut edge(), "repriced", "q.fresh", "1", strict).await;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the edge still prices by version 1: {quote:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let again_strict = debit_messages(&mut edge(), "repriced", "q.strict", "3", strict).await;
    let again_cached = debit_messages(&mut edge(), "repriced", "q.cached", "3", cached).await;

    let priced = |d: &pb::Debited| {
        let priced = d.priced.clone().unwrap_or_default();
        (priced.cost, priced.price_version, d.replayed)
    };
    assert_eq!(
        [
            priced(&first_strict),
            priced(&again_strict),
            priced(&first_cached),
            priced(&again_cached),
            priced(&fresh),
        ],
        [
            ("3".to_owned(), 1, false),
            ("3".to_owned(), 1, true),
            ("3".to_owned(), 1, false),
            ("3".to_owned(), 1, true),
            ("2".to_owned(), 2, false),
        ],
        "(cost, price version, replayed): strict, its retry, cached, its retry, a new key"
    );
    let balance = edge_balance(&mut edge(), "repriced").await;
    assert_eq!(
        balance_of(&balance),
        "92",
        "one charge per key: {balance:?}"
    );
    let ledger = reconciled_ledger_balance(admin, "repriced", "92", reconciled_within_ms).await;
    assert_eq!(ledger, "92", "the ledger charged each key once");
}

/// The Envoy adapter an edge serves, with the key it accepts.
#[derive(Clone)]
pub struct EnvoyAdapter {
    pub channel: Channel,
    pub key: String,
}

impl EnvoyAdapter {
    /// `ShouldRateLimit` for `hits` messages of `chat` (1 credit each) by `account`.
    pub async fn ask(&self, account: &str, hits: u64) -> RateLimitResponse {
        super::envoy::should_rate_limit_chat(self.channel.clone(), &self.key, account, hits).await
    }
}

/// What an Envoy reply says, as (overall code, what its header says): `balance=` of the
/// `x-tollgate` header when allowed, the whole `x-tollgate-refusal` header when over the limit.
pub fn envoy_answer(reply: &RateLimitResponse) -> (EnvoyCode, String) {
    let header = |key: &str| {
        reply
            .response_headers_to_add
            .iter()
            .find(|header| header.key == key)
            .map(|header| header.value.clone())
    };
    match EnvoyCode::try_from(reply.overall_code) {
        Ok(EnvoyCode::Ok) => {
            let note = super::envoy::tollgate_note(reply);
            let balance = note
                .split(';')
                .find_map(|part| part.trim().strip_prefix("balance="))
                .unwrap_or_else(|| panic!("no balance= in x-tollgate: {note}"));
            (EnvoyCode::Ok, balance.to_owned())
        }
        Ok(code) => (code, header("x-tollgate-refusal").unwrap_or_default()),
        Err(_) => panic!("an unknown overall code: {reply:?}"),
    }
}

/// A new `account` with a grant `today` of 100 at priority 10, effective now, and a grant
/// `tomorrow` of 100 at the better priority 0, effective in a day: burn-down order must skip
/// what is not effective yet rather than stop at it.
async fn account_with_a_future_grant(admin: &mut Admin, account: &str) {
    create_account(admin, account).await;
    grant_at(admin, account, "today", "100", 10, None).await;
    let tomorrow = now_seconds() + 86_400;
    grant_at(admin, account, "tomorrow", "100", 0, Some(tomorrow)).await;
}

/// Through the Envoy adapter, 200 concurrent calls of 1 credit on `envoy-small` (100 credits,
/// set up here) allow exactly 100 and refuse the other 100 as insufficient credits
/// (OVER_LIMIT); the edge and, once reconciled, the ledger say 0.
pub async fn assert_the_envoy_adapter_allows_exactly_what_the_account_holds(
    admin: &mut Admin,
    envoy: &EnvoyAdapter,
    edge: impl Fn() -> Edge,
    reconciled_within_ms: u64,
) {
    create_account(admin, "envoy-small").await;
    grant(admin, "envoy-small", "g1", "100").await;
    let tasks: Vec<_> = (0..200)
        .map(|_| {
            let envoy = envoy.clone();
            tokio::spawn(async move { envoy.ask("envoy-small", 1).await })
        })
        .collect();
    let (mut allowed, mut insufficient, mut other) = (0, 0, Vec::new());
    for task in tasks {
        // The allowed calls' `balance=` is not judged here: today a strict decision that did
        // not itself ask the authority tells its balance from the account summary read before
        // another decision's cold path moved the authority's credits into the region, so it
        // counts them twice (up to 199 on this account of 100). Once the edge tells it from
        // the summary published after, the sorted headers should be exactly 0 to 99.
        match envoy_answer(&task.await.unwrap()) {
            (EnvoyCode::Ok, _) => allowed += 1,
            (EnvoyCode::OverLimit, note) if note.starts_with("insufficient_credits;") => {
                insufficient += 1
            }
            answer => other.push(answer),
        }
    }
    let balance = edge_balance(&mut edge(), "envoy-small").await;
    let ledger = reconciled_ledger_balance(admin, "envoy-small", "0", reconciled_within_ms).await;
    assert_eq!(
        (
            allowed,
            insufficient,
            other.len(),
            balance_of(&balance),
            ledger.as_str()
        ),
        (100, 100, 0, "0", "0"),
        "(allowed, insufficient, other answers, GetBalance, ledger after reconciliation); \
         other: {other:?}"
    );
}

/// Through the Envoy adapter, a grant of better priority that is not effective yet blocks
/// nothing: on `envoy-later` (set up here, see [`account_with_a_future_grant`]) calls of 30 and
/// 70 are allowed and leave 70 and 0, and one more credit is over the limit, short by 1.
pub async fn assert_the_envoy_adapter_is_not_blocked_by_a_future_grant(
    admin: &mut Admin,
    envoy: &EnvoyAdapter,
    edge: impl Fn() -> Edge,
) {
    account_with_a_future_grant(admin, "envoy-later").await;
    let mut answers = Vec::new();
    for hits in [30, 70, 1] {
        answers.push(envoy_answer(&envoy.ask("envoy-later", hits).await));
    }
    let balance = edge_balance(&mut edge(), "envoy-later").await;
    assert_eq!(
        (answers, balance_of(&balance)),
        (
            vec![
                (EnvoyCode::Ok, "70".to_owned()),
                (EnvoyCode::Ok, "0".to_owned()),
                (
                    EnvoyCode::OverLimit,
                    "insufficient_credits; shortfall=1".to_owned()
                ),
            ],
            "0"
        ),
        "((code, balance or refusal) of calls of 30, 70 and 1, GetBalance); {balance:?}"
    );
}

/// The Envoy adapter's `balance=` is the account's balance: on `envoy-books` (100 credits, set
/// up here) calls of 20, 5 and 12 answer 80, 75 and 63, and the ledger, once reconciled, and
/// Enforcement's GetBalance say the last of them.
pub async fn assert_the_envoy_balance_header_equals_the_ledger_after_reconciliation(
    admin: &mut Admin,
    envoy: &EnvoyAdapter,
    edge: impl Fn() -> Edge,
    reconciled_within_ms: u64,
) {
    create_account(admin, "envoy-books").await;
    grant(admin, "envoy-books", "g1", "100").await;
    let mut answers = Vec::new();
    for hits in [20, 5, 12] {
        answers.push(envoy_answer(&envoy.ask("envoy-books", hits).await));
    }
    let ok = |balance: &str| (EnvoyCode::Ok, balance.to_owned());
    assert_eq!(answers, [ok("80"), ok("75"), ok("63")], "(code, balance=)");
    let ledger = reconciled_ledger_balance(admin, "envoy-books", "63", reconciled_within_ms).await;
    let balance = edge_balance(&mut edge(), "envoy-books").await;
    assert_eq!(
        (answers[2].1.as_str(), balance_of(&balance)),
        (ledger.as_str(), ledger.as_str()),
        "(the last balance=, GetBalance) against the ledger after reconciliation"
    );
}

/// In cached mode, a grant of better priority that is not effective yet blocks nothing: on
/// `cached-later` (set up here, see [`account_with_a_future_grant`]) a cached debit of 30 draws
/// it from `today` and leaves 70, which GetBalance and Quote agree with; a cached debit of 70
/// then leaves 0, and one more credit is refused as insufficient.
pub async fn assert_cached_mode_is_not_blocked_by_a_future_grant(
    admin: &mut Admin,
    edge: impl Fn() -> Edge,
) {
    account_with_a_future_grant(admin, "cached-later").await;
    let cached = pb::EnforcementMode::Cached;
    let mut edge = edge();
    let first = debited(debit(&mut edge, "cached-later", "d1", "30", cached).await);
    let balance = edge_balance(&mut edge, "cached-later").await;
    let quote = quote(&mut edge, "cached-later", "50").await;
    let second = debited(debit(&mut edge, "cached-later", "d2", "70", cached).await);
    let refused = refusal_code(debit(&mut edge, "cached-later", "d3", "1", cached).await);
    assert_eq!(
        (
            first.balance_after.as_str(),
            draws(&first),
            balance_of(&balance),
            quote.affordable,
            quote.available.as_str(),
            second.balance_after.as_str(),
            refused,
        ),
        (
            "70",
            vec![("today", "30")],
            "70",
            true,
            "70",
            "0",
            pb::RefusalCode::InsufficientCredits
        ),
        "(balance_after of 30, its draws, GetBalance, Quote.affordable, Quote.available, \
         balance_after of 70, a further credit); GetBalance {balance:?}"
    );
}

/// Cached decisions are the account's answer too, though they reach the region a flush later:
/// on `cached-books` (100 credits, set up here) cached debits of 10, 5, 2.5 and 40 answer 90,
/// 85, 82.5 and 42.5, and the ledger, once the flushed usage is reconciled, and GetBalance
/// then say the last of them.
pub async fn assert_cached_balance_after_and_get_balance_equal_the_ledger_after_reconciliation(
    admin: &mut Admin,
    edge: impl Fn() -> Edge,
    reconciled_within_ms: u64,
) {
    create_account(admin, "cached-books").await;
    grant(admin, "cached-books", "g1", "100").await;
    let cached = pb::EnforcementMode::Cached;
    let mut edge = edge();
    let mut balances_after = Vec::new();
    for (key, credits) in [("d1", "10"), ("d2", "5"), ("d3", "2.5"), ("d4", "40")] {
        let outcome = debit(&mut edge, "cached-books", key, credits, cached).await;
        balances_after.push(debited(outcome).balance_after);
    }
    assert_eq!(
        balances_after,
        ["90", "85", "82.5", "42.5"],
        "each cached Debit's balance_after"
    );
    // GetBalance is read once the ledger has the flushed usage, not at once: today a GetBalance
    // that races a flush reads the region's lease before the flush and this edge's unflushed
    // decisions after it, and counts the flushed ones as still leased (85 here, not 42.5).
    let ledger =
        reconciled_ledger_balance(admin, "cached-books", "42.5", reconciled_within_ms).await;
    let balance = edge_balance(&mut edge, "cached-books").await;
    assert_eq!(
        (balances_after[3].as_str(), balance_of(&balance)),
        (ledger.as_str(), ledger.as_str()),
        "(the last balance_after, GetBalance) against the ledger after reconciliation"
    );
}

/// Reverses the debit whose idempotency key is `debit_key`, under `key`.
pub async fn reverse(edge: &mut Edge, account: &str, key: &str, debit_key: &str) -> pb::Reversed {
    let reply = edge
        .reverse(pb::ReverseRequest {
            idempotency_key: key.into(),
            account_id: account.into(),
            debit_id: debit_key.into(),
        })
        .await
        .unwrap()
        .into_inner();
    match reply.outcome {
        Some(pb::reverse_reply::Outcome::Reversed(reversed)) => reversed,
        other => panic!("not reversed: {other:?}"),
    }
}

/// A Reverse answers the account's balance with the debit given back: on `reversed` (100
/// credits, set up here) a strict debit of 30, a cached debit of 20 and a strict debit of 5
/// leave 45; reversing the 30 answers 75 and reversing the cached 20 answers 95, which the
/// ledger says once reconciled (a figure no earlier state of the account had) and GetBalance
/// too.
pub async fn assert_reverse_balance_after_equals_the_ledger_after_reconciliation(
    admin: &mut Admin,
    edge: impl Fn() -> Edge,
    reconciled_within_ms: u64,
) {
    create_account(admin, "reversed").await;
    grant(admin, "reversed", "g1", "100").await;
    let (strict, cached) = (pb::EnforcementMode::Strict, pb::EnforcementMode::Cached);
    let mut edge = edge();
    for (key, credits, mode) in [
        ("d1", "30", strict),
        ("d2", "20", cached),
        ("d3", "5", strict),
    ] {
        debited(debit(&mut edge, "reversed", key, credits, mode).await);
    }
    let first = reverse(&mut edge, "reversed", "v1", "d1").await;
    let second = reverse(&mut edge, "reversed", "v2", "d2").await;
    let as_pair = |r: &pb::Reversed| (r.reversed.clone(), r.balance_after.clone());
    assert_eq!(
        [as_pair(&first), as_pair(&second)],
        [
            ("30".to_owned(), "75".to_owned()),
            ("20".to_owned(), "95".to_owned())
        ],
        "(reversed, balance_after) of reversing the strict 30, then the cached 20"
    );
    let ledger = reconciled_ledger_balance(admin, "reversed", "95", reconciled_within_ms).await;
    let balance = edge_balance(&mut edge, "reversed").await;
    assert_eq!(
        (second.balance_after.as_str(), balance_of(&balance)),
        (ledger.as_str(), ledger.as_str()),
        "(the last Reverse's balance_after, GetBalance) against the ledger after reconciliation"
    );
}

/// A debit into the overdraft answers a negative balance, the account's debt: on `overdrawn`
/// (overdraft limit 10 and a grant of 3, set up here) a debit of 10 draws the 3, takes 7 into
/// the overdraft and answers -7, with 3 of the limit left to spend; the ledger says -7 once
/// reconciled, and GetBalance too.
pub async fn assert_a_debit_into_the_overdraft_answers_the_ledger_s_negative_balance(
    admin: &mut Admin,
    edge: impl Fn() -> Edge,
    reconciled_within_ms: u64,
) {
    admin
        .create_account(pb::CreateAccountRequest {
            idempotency_key: "account.overdrawn".into(),
            account_id: "overdrawn".into(),
            overdraft_limit: "10".into(),
            ..pb::CreateAccountRequest::default()
        })
        .await
        .unwrap();
    grant(admin, "overdrawn", "g1", "3").await;
    let mut edge = edge();
    let strict = pb::EnforcementMode::Strict;
    let debited = debited(debit(&mut edge, "overdrawn", "d1", "10", strict).await);
    let balance = edge_balance(&mut edge, "overdrawn").await;
    assert_eq!(
        (
            draws(&debited),
            debited.overdraft.as_str(),
            debited.balance_after.as_str(),
            balance_of(&balance),
            balance.available.as_str(),
        ),
        (vec![("g1", "3")], "7", "-7", "-7", "3"),
        "(draws, overdraft, balance_after, GetBalance balance, GetBalance available)"
    );
    let ledger = reconciled_ledger_balance(admin, "overdrawn", "-7", reconciled_within_ms).await;
    let balance = edge_balance(&mut edge, "overdrawn").await;
    assert_eq!(
        (debited.balance_after.as_str(), balance_of(&balance)),
        (ledger.as_str(), ledger.as_str()),
        "(balance_after, GetBalance) against the ledger after reconciliation"
    );
}
