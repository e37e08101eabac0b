//! Hostile input against the Enforcement service, decoded by the real service over the
//! in-memory regional store: invalid, over-precise and huge decimals, empty, unicode,
//! control-character and oversized ids, unknown modes, hold lifetimes out of range, missing
//! usage, event times anywhere, oversized metadata, `Enforce` stream items of every kind, and
//! valid requests cut on the wire and followed by garbage.
//!
//! An independent judge (built from the core's constructors, not from the service's code)
//! says which fields of each request are malformed. A call with a malformed field fails
//! `INVALID_ARGUMENT` naming one of those fields; a well-formed call succeeds or fails only in
//! the ways its contract allows (an unknown account, a reused idempotency key); nothing panics;
//! and a call that fails leaves the region exactly as it was.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use common::seed;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseResult, TestRunner};
use prost::Message;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_stream::StreamExt;
use tollgate_core::{
    cost, AccountId, ActorId, Credits, FeatureKey, HoldId, Quantity, Rate, RegionId, Timestamp,
};
use tollgate_edge::metrics::Metrics;
use tollgate_edge::service::EnforcementService;
use tollgate_edge::settings::{EVENT_TIME_FUTURE_MS_MAX, EVENT_TIME_PAST_MS_MAX};
use tollgate_edge::{EdgeSettings, Engine, ManualClock};
use tollgate_proto::pb;
use tollgate_proto::pb::enforcement_client::EnforcementClient;
use tollgate_proto::pb::enforcement_server::{Enforcement, EnforcementServer};
use tollgate_region::{
    AccountSummary, AccountView, EnforcementMode, MemoryRegionStore, RegionStore, UsageRecord,
    REGION_MICROS_MAX,
};
use tonic::transport::Channel;
use tonic::{Code, Request};

/// Calls of each unary request type.
const CASES: u32 = 192;
/// `Enforce` streams opened, each with up to `STREAM_ITEMS_MAX` requests.
const STREAM_CASES: u32 = 64;
const STREAM_ITEMS_MAX: usize = 8;
/// Valid requests followed by garbage, about 128 of each type.
const GARBAGE_CASES: u32 = 7 * 128;
/// The funded account that most generated requests name.
const ACCOUNT: &str = "acme";
/// The edge's (manual) clock: event times are judged against it, and it never moves, so no
/// hold or lease expires between two reads of the region.
const NOW_MS: i64 = 1_700_000_000_000;
const USAGE_GROUP: &str = "hostile";

// ---- Generators -------------------------------------------------------------------------------
//
// Each field is usually what a caller means to send and sometimes hostile, so that a request
// often gets past its first fields and the later ones (metadata, event time) are reached too.

fn texts(list: &'static [&'static str]) -> impl Strategy<Value = String> {
    prop::sample::select(list).prop_map(str::to_owned)
}

/// Text a caller might send where a decimal (quantity, cost, amount) is expected.
fn hostile_decimal() -> impl Strategy<Value = String> {
    prop_oneof![
        texts(&[
            "",
            "0",
            "-0",
            "-1",
            "1e5",
            "NaN",
            "inf",
            "1.0000001",
            "0.1234560",
            "+1",
            "1.",
            ".5",
            "0x1F",
            "1_000",
            "1,5",
            " 1",
            "1 ",
            "\t1\n",
            "١٢٣",
            "１２",
            "½",
            // Beyond u64, beyond i64 micro-credits, and both sides of the region's exact range.
            "99999999999999999999",
            "9223372036854.775807",
            "9223372036854.775808",
            "9007199254.740991",
            "9007199254.740992",
            // Both sides of the largest quantity.
            "1000000000000",
            "1000000000000.000001",
        ]),
        "[0-9]{1,13}(\\.[0-9]{1,7})?",
        "-?[0-9]{0,3}\\.?[0-9]{0,8}",
        "[0-9]{41,60}",
        ".{0,12}",
    ]
}

fn decimal_text() -> impl Strategy<Value = String> {
    prop_oneof![3 => "[0-9]{1,3}(\\.[0-9]{1,6})?", 2 => hostile_decimal()]
}

/// Text a caller might send where an identifier is expected.
fn id_text() -> impl Strategy<Value = String> {
    prop_oneof![
        texts(&[
            "",
            " ",
            "acme ",
            " acme",
            "acme\u{0}",
            "acme\n",
            "\u{7f}",
            "é",
            "ａｃｍｅ",
            "a b",
            "a/b",
            "a\u{200b}b",
            "😀",
            "%00",
            "a@b",
        ]),
        "[A-Za-z0-9._:-]{1,24}",
        "[!-~]{1,24}",
        "\\PC{1,12}",
        "[\\x00-\\x1f\\x7f]{1,4}",
        // Both sides of the 128-byte limit, and far past it.
        Just("x".repeat(128)),
        Just("x".repeat(129)),
        "[a-z]{120,140}",
        Just("k".repeat(100_000)),
    ]
}

fn key_text() -> impl Strategy<Value = String> {
    prop_oneof![4 => "[!-~]{1,24}", 1 => id_text()]
}

fn account_text() -> impl Strategy<Value = String> {
    prop_oneof![4 => Just(ACCOUNT.to_owned()), 1 => id_text()]
}

fn feature_text() -> impl Strategy<Value = String> {
    prop_oneof![
        6 => texts(&["gen", "lookup", "api_call"]),
        1 => Just("teleport".to_owned()),
        1 => id_text(),
    ]
}

fn actor_text() -> impl Strategy<Value = String> {
    prop_oneof![
        2 => Just(String::new()),
        2 => "[a-z]{1,8}@[a-z]{1,8}\\.com",
        1 => id_text(),
    ]
}

fn usage() -> impl Strategy<Value = Option<pb::Usage>> {
    use pb::usage::Amount;
    let amount = prop_oneof![
        1 => Just(None),
        6 => decimal_text().prop_map(|text| Some(Amount::Quantity(text))),
        4 => decimal_text().prop_map(|text| Some(Amount::Cost(text))),
    ];
    prop_oneof![
        1 => Just(None),
        10 => (feature_text(), amount).prop_map(|(feature, amount)| Some(pb::Usage { feature, amount })),
    ]
}

fn mode() -> impl Strategy<Value = i32> {
    prop_oneof![8 => 0..=2_i32, 1 => Just(3), 1 => Just(-1), 1 => any::<i32>()]
}

fn ttl_seconds() -> impl Strategy<Value = u32> {
    // 0 (the default), both ends of 1 s ..= 7 days, just past them, anything.
    prop_oneof![
        2 => Just(0_u32),
        1 => Just(1),
        1 => Just(604_800),
        1 => Just(604_801),
        4 => 1..=604_800_u32,
        1 => any::<u32>(),
    ]
}

fn event_time() -> impl Strategy<Value = Option<prost_types::Timestamp>> {
    // A few seconds on either side of the accepted window.
    let near = (-(EVENT_TIME_PAST_MS_MAX + 5_000)..=EVENT_TIME_FUTURE_MS_MAX + 5_000).prop_map(
        |offset_ms| {
            let at = NOW_MS + offset_ms;
            prost_types::Timestamp {
                seconds: at.div_euclid(1_000),
                nanos: i32::try_from(at.rem_euclid(1_000) * 1_000_000).unwrap(),
            }
        },
    );
    prop_oneof![
        3 => Just(None),
        3 => near.prop_map(Some),
        1 => (any::<i64>(), any::<i32>())
            .prop_map(|(seconds, nanos)| Some(prost_types::Timestamp { seconds, nanos })),
    ]
}

fn metadata() -> impl Strategy<Value = HashMap<String, String>> {
    prop_oneof![
        4 => Just(HashMap::new()),
        4 => prop::collection::hash_map("[a-z_]{1,12}", "[ -~]{0,24}", 0..4),
        1 => prop::collection::hash_map(id_text(), id_text(), 0..40),
        // Past the byte limit with few entries.
        1 => prop::collection::hash_map("[a-z]{1,8}", "[a-z]{300,400}", 10..16),
    ]
}

/// Hold ids and debit keys that exist in the region, or hostile ones.
fn known_or_hostile(known: &[String]) -> impl Strategy<Value = String> {
    prop_oneof![4 => prop::sample::select(known.to_vec()), 1 => id_text()]
}

// ---- Requests and the judge -------------------------------------------------------------------

#[derive(Clone, Debug)]
enum Call {
    Authorize(pb::AuthorizeRequest),
    Capture(pb::CaptureRequest),
    Release(pb::ReleaseRequest),
    Debit(pb::DebitRequest),
    Reverse(pb::ReverseRequest),
    GetBalance(pb::GetBalanceRequest),
    Quote(pb::QuoteRequest),
}

fn authorize_calls() -> BoxedStrategy<Call> {
    (
        key_text(),
        account_text(),
        usage(),
        ttl_seconds(),
        actor_text(),
        mode(),
        metadata(),
    )
        .prop_map(|(key, account, usage, ttl, actor, mode, metadata)| {
            Call::Authorize(pb::AuthorizeRequest {
                idempotency_key: key,
                account_id: account,
                usage,
                ttl_seconds: ttl,
                actor_id: actor,
                mode,
                metadata,
            })
        })
        .boxed()
}

/// The idempotency key of the `n`th hold the edge places at setup.
fn setup_hold_key(n: usize) -> String {
    format!("setup-hold-{n}")
}

/// How a capture or release names its hold, as (`hold_id`, `authorize_key`): by id (known or
/// hostile), by the key of the Authorize that placed it (a setup key or any text), by both, or
/// by neither.
fn hold_reference(holds: &[String]) -> impl Strategy<Value = (String, String)> {
    let setup_keys: Vec<String> = (0..holds.len()).map(setup_hold_key).collect();
    let by_key = prop_oneof![3 => prop::sample::select(setup_keys), 1 => key_text()];
    prop_oneof![
        6 => known_or_hostile(holds).prop_map(|id| (id, String::new())),
        3 => by_key.prop_map(|key| (String::new(), key)),
        1 => (known_or_hostile(holds), key_text()),
        1 => Just((String::new(), String::new())),
    ]
}

fn capture_calls(holds: &[String]) -> BoxedStrategy<Call> {
    let amount = prop_oneof![1 => Just(String::new()), 3 => decimal_text()];
    (key_text(), account_text(), hold_reference(holds), amount)
        .prop_map(|(key, account, (hold_id, authorize_key), amount)| {
            Call::Capture(pb::CaptureRequest {
                idempotency_key: key,
                account_id: account,
                hold_id,
                amount,
                authorize_key,
            })
        })
        .boxed()
}

fn release_calls(holds: &[String]) -> BoxedStrategy<Call> {
    (key_text(), account_text(), hold_reference(holds))
        .prop_map(|(key, account, (hold_id, authorize_key))| {
            Call::Release(pb::ReleaseRequest {
                idempotency_key: key,
                account_id: account,
                hold_id,
                authorize_key,
            })
        })
        .boxed()
}

fn debit_calls() -> BoxedStrategy<Call> {
    (
        key_text(),
        account_text(),
        usage(),
        actor_text(),
        mode(),
        event_time(),
        metadata(),
    )
        .prop_map(|(key, account, usage, actor, mode, event_time, metadata)| {
            Call::Debit(pb::DebitRequest {
                idempotency_key: key,
                account_id: account,
                usage,
                actor_id: actor,
                mode,
                event_time,
                metadata,
            })
        })
        .boxed()
}

fn reverse_calls(debits: &[String]) -> BoxedStrategy<Call> {
    (key_text(), account_text(), known_or_hostile(debits))
        .prop_map(|(key, account, debit)| {
            Call::Reverse(pb::ReverseRequest {
                idempotency_key: key,
                account_id: account,
                debit_id: debit,
            })
        })
        .boxed()
}

fn get_balance_calls() -> BoxedStrategy<Call> {
    let feature = prop_oneof![1 => Just(String::new()), 2 => feature_text()];
    (account_text(), feature)
        .prop_map(|(account, feature)| {
            Call::GetBalance(pb::GetBalanceRequest {
                account_id: account,
                feature,
            })
        })
        .boxed()
}

fn quote_calls() -> BoxedStrategy<Call> {
    (account_text(), usage())
        .prop_map(|(account, usage)| {
            Call::Quote(pb::QuoteRequest {
                account_id: account,
                usage,
            })
        })
        .boxed()
}

/// The fields of a request that are malformed: the call must fail naming one of them.
#[derive(Debug, Default)]
struct Verdict {
    invalid: Vec<&'static str>,
}

impl Verdict {
    fn field(&mut self, name: &'static str, malformed: bool) -> &mut Self {
        if malformed {
            self.invalid.push(name);
        }
        self
    }
}

/// The rate of each feature in the price book `common::seed` publishes.
fn rate(feature: &str) -> Option<Rate> {
    let rate = match feature {
        "gen" => "0.5",
        "lookup" | "api_call" => "1",
        _ => return None,
    };
    Some(Rate::parse(rate).unwrap())
}

fn beyond_region(credits: Credits) -> bool {
    credits.micros() > REGION_MICROS_MAX
}

/// `spends`: the call spends the priced cost from the funded account (Debit and Authorize on
/// it; other accounts are refused as unknown before pricing), so a cost beyond the regional
/// store's exact range is out of range.
fn judge_usage(verdict: &mut Verdict, usage: Option<&pb::Usage>, spends: bool) {
    use pb::usage::Amount;
    let Some(usage) = usage else {
        verdict.field("usage", true);
        return;
    };
    verdict.field(
        "usage.feature",
        FeatureKey::new(usage.feature.as_str()).is_err(),
    );
    match &usage.amount {
        None => {
            verdict.field("usage", true);
        }
        Some(Amount::Quantity(text)) => match Quantity::parse(text) {
            Err(_) => {
                verdict.field("usage.quantity", true);
            }
            Ok(quantity) => {
                let priced = rate(&usage.feature).map(|rate| cost(rate, quantity));
                let beyond = priced.is_some_and(|c| c.map_or(true, beyond_region));
                verdict.field("usage.quantity", spends && beyond);
            }
        },
        Some(Amount::Cost(text)) => {
            let parsed = (!text.is_empty())
                .then(|| Credits::parse_non_negative(text))
                .transpose();
            match parsed {
                Err(_) => {
                    verdict.field("usage.cost", true);
                }
                Ok(amount) => {
                    verdict.field("usage.cost", spends && amount.is_some_and(beyond_region));
                }
            }
        }
    }
}

fn malformed_id<T: TryFrom<String>>(text: &str) -> bool {
    T::try_from(text.to_owned()).is_err()
}

fn malformed_optional_id<T: TryFrom<String>>(text: &str) -> bool {
    !text.is_empty() && malformed_id::<T>(text)
}

fn malformed_key(text: &str) -> bool {
    malformed_id::<tollgate_core::IdempotencyKey>(text)
}

fn malformed_mode(value: i32) -> bool {
    pb::EnforcementMode::try_from(value).is_err()
}

fn malformed_metadata(entries: &HashMap<String, String>) -> bool {
    let sorted = entries.clone().into_iter().collect();
    tollgate_core::command::Metadata::new(sorted).is_err()
}

fn malformed_ttl(seconds: u32) -> bool {
    let millis = i64::from(seconds) * 1_000;
    seconds != 0
        && !(tollgate_core::hold::HOLD_TTL_MS_MIN..=tollgate_core::hold::HOLD_TTL_MS_MAX)
            .contains(&millis)
}

/// An event time must be a real instant, and near the edge's clock.
fn malformed_event_time(at: Option<&prost_types::Timestamp>) -> bool {
    let Some(at) = at else { return false };
    let millis = at
        .seconds
        .checked_mul(1_000)
        .and_then(|ms| ms.checked_add(i64::from(at.nanos / 1_000_000)));
    match millis {
        Some(millis) if (0..1_000_000_000).contains(&at.nanos) => {
            let offset = millis - NOW_MS;
            Timestamp::from_millis(millis).is_err()
                || offset > EVENT_TIME_FUTURE_MS_MAX
                || -offset > EVENT_TIME_PAST_MS_MAX
        }
        _ => true,
    }
}

/// A hold is named by `hold_id` or by `authorize_key`, exactly one: neither blames `hold_id`,
/// both blame `authorize_key`.
fn judge_hold(verdict: &mut Verdict, hold_id: &str, authorize_key: &str) {
    match (hold_id.is_empty(), authorize_key.is_empty()) {
        (_, true) => verdict.field("hold_id", malformed_id::<HoldId>(hold_id)),
        (true, false) => verdict.field("authorize_key", malformed_key(authorize_key)),
        (false, false) => verdict.field("authorize_key", true),
    };
}

/// A capture amount: empty (the whole hold), or credits within the region's range.
fn malformed_capture_amount(text: &str) -> bool {
    !text.is_empty() && Credits::parse_non_negative(text).map_or(true, beyond_region)
}

impl Call {
    fn verdict(&self) -> Verdict {
        let mut v = Verdict::default();
        match self {
            Call::Authorize(r) => {
                v.field("idempotency_key", malformed_key(&r.idempotency_key))
                    .field("account_id", malformed_id::<AccountId>(&r.account_id))
                    .field("ttl_seconds", malformed_ttl(r.ttl_seconds))
                    .field("actor_id", malformed_optional_id::<ActorId>(&r.actor_id))
                    .field("mode", malformed_mode(r.mode))
                    .field("metadata", malformed_metadata(&r.metadata));
                judge_usage(&mut v, r.usage.as_ref(), r.account_id == ACCOUNT);
            }
            Call::Capture(r) => {
                v.field("idempotency_key", malformed_key(&r.idempotency_key))
                    .field("account_id", malformed_id::<AccountId>(&r.account_id))
                    .field("amount", malformed_capture_amount(&r.amount));
                judge_hold(&mut v, &r.hold_id, &r.authorize_key);
            }
            Call::Release(r) => {
                v.field("idempotency_key", malformed_key(&r.idempotency_key))
                    .field("account_id", malformed_id::<AccountId>(&r.account_id));
                judge_hold(&mut v, &r.hold_id, &r.authorize_key);
            }
            Call::Debit(r) => {
                v.field("idempotency_key", malformed_key(&r.idempotency_key))
                    .field("account_id", malformed_id::<AccountId>(&r.account_id))
                    .field("actor_id", malformed_optional_id::<ActorId>(&r.actor_id))
                    .field("mode", malformed_mode(r.mode))
                    .field("event_time", malformed_event_time(r.event_time.as_ref()))
                    .field("metadata", malformed_metadata(&r.metadata));
                judge_usage(&mut v, r.usage.as_ref(), r.account_id == ACCOUNT);
            }
            Call::Reverse(r) => {
                v.field("idempotency_key", malformed_key(&r.idempotency_key))
                    .field("account_id", malformed_id::<AccountId>(&r.account_id))
                    .field("debit_id", malformed_key(&r.debit_id));
            }
            Call::GetBalance(r) => {
                v.field("account_id", malformed_id::<AccountId>(&r.account_id))
                    .field("feature", malformed_optional_id::<FeatureKey>(&r.feature));
            }
            Call::Quote(r) => {
                v.field("account_id", malformed_id::<AccountId>(&r.account_id));
                judge_usage(&mut v, r.usage.as_ref(), false);
            }
        }
        v
    }

    /// How a well-formed request may still fail, and the field the message then names.
    fn refusals(&self) -> &'static [(Code, &'static str)] {
        match self {
            Call::GetBalance(_) => &[(Code::NotFound, "account_id")],
            Call::Quote(_) => &[
                (Code::NotFound, "account_id"),
                (Code::NotFound, "usage.feature"),
            ],
            _ => &[(Code::AlreadyExists, "idempotency_key")],
        }
    }

    fn account_id(&self) -> &str {
        match self {
            Call::Authorize(r) => &r.account_id,
            Call::Capture(r) => &r.account_id,
            Call::Release(r) => &r.account_id,
            Call::Debit(r) => &r.account_id,
            Call::Reverse(r) => &r.account_id,
            Call::GetBalance(r) => &r.account_id,
            Call::Quote(r) => &r.account_id,
        }
    }

    fn encode(&self) -> Vec<u8> {
        match self {
            Call::Authorize(r) => r.encode_to_vec(),
            Call::Capture(r) => r.encode_to_vec(),
            Call::Release(r) => r.encode_to_vec(),
            Call::Debit(r) => r.encode_to_vec(),
            Call::Reverse(r) => r.encode_to_vec(),
            Call::GetBalance(r) => r.encode_to_vec(),
            Call::Quote(r) => r.encode_to_vec(),
        }
    }

    /// `bytes` decoded as a request of the same type, when prost accepts them.
    fn decode_like(&self, bytes: &[u8]) -> Option<Call> {
        match self {
            Call::Authorize(_) => pb::AuthorizeRequest::decode(bytes)
                .ok()
                .map(Call::Authorize),
            Call::Capture(_) => pb::CaptureRequest::decode(bytes).ok().map(Call::Capture),
            Call::Release(_) => pb::ReleaseRequest::decode(bytes).ok().map(Call::Release),
            Call::Debit(_) => pb::DebitRequest::decode(bytes).ok().map(Call::Debit),
            Call::Reverse(_) => pb::ReverseRequest::decode(bytes).ok().map(Call::Reverse),
            Call::GetBalance(_) => pb::GetBalanceRequest::decode(bytes)
                .ok()
                .map(Call::GetBalance),
            Call::Quote(_) => pb::QuoteRequest::decode(bytes).ok().map(Call::Quote),
        }
    }

    /// The request as an item of an `Enforce` stream (only the four calls the stream carries).
    fn enforce_item(&self) -> pb::enforce_request::Request {
        use pb::enforce_request::Request as Item;
        match self.clone() {
            Call::Authorize(r) => Item::Authorize(r),
            Call::Capture(r) => Item::Capture(r),
            Call::Release(r) => Item::Release(r),
            Call::Debit(r) => Item::Debit(r),
            other => unreachable!("{other:?} is not carried by Enforce"),
        }
    }
}

/// Whether `message` names `field` the way `ServiceError::invalid` does (`"<field>: ..."`).
fn names(message: &str, field: &str) -> bool {
    message
        .strip_prefix(field)
        .is_some_and(|rest| rest.starts_with(':'))
}

/// The rule every call obeys, given the judge's verdict on its request.
fn judge(call: &Call, outcome: &Result<(), (Code, String)>) -> TestCaseResult {
    let verdict = call.verdict();
    match outcome {
        Ok(()) => prop_assert!(
            verdict.invalid.is_empty(),
            "accepted although {:?} are malformed: {call:?}",
            verdict.invalid
        ),
        Err((Code::InvalidArgument, message)) => prop_assert!(
            verdict.invalid.iter().any(|field| names(message, field)),
            "{message:?} names none of the malformed fields {:?}: {call:?}",
            verdict.invalid
        ),
        Err((code, message)) => {
            prop_assert!(
                verdict.invalid.is_empty(),
                "{code:?} {message:?} for a request with malformed {:?}: {call:?}",
                verdict.invalid
            );
            prop_assert!(
                call.refusals()
                    .iter()
                    .any(|(allowed, field)| allowed == code && names(message, field)),
                "{code:?} {message:?} is not how a well-formed request fails: {call:?}"
            );
        }
    }
    Ok(())
}

// ---- The edge under test ----------------------------------------------------------------------

/// What the region shows of one account.
#[derive(Debug, PartialEq)]
struct AccountState {
    view: AccountView,
    summary: Option<AccountSummary>,
}

/// One edge over an in-memory region: a funded account, a few open holds and debits to reverse.
struct Edge {
    store: Arc<MemoryRegionStore>,
    service: Arc<EnforcementService<MemoryRegionStore>>,
    holds: Vec<String>,
    debits: Vec<String>,
    /// A fresh consumer per read, so that a read returns only the records appended since the
    /// last one.
    reads: AtomicU64,
}

impl Edge {
    async fn start() -> Edge {
        let store = Arc::new(MemoryRegionStore::default());
        seed(store.as_ref(), ACCOUNT, "1000000", EnforcementMode::Strict).await;
        store.create_usage_group(USAGE_GROUP).await.unwrap();
        let clock = Arc::new(ManualClock::new(Timestamp::from_millis(NOW_MS).unwrap()));
        let mut settings = EdgeSettings::new(RegionId::new("eu").unwrap());
        // No standing lease: a background refill would write to the region between the two
        // reads around a call. Cached decisions still take what they need inside the call.
        settings.lease_credits = Credits::ZERO;
        let engine = Arc::new(Engine::new(Arc::clone(&store), settings, clock));
        engine
            .catalogue()
            .reload_prices(store.as_ref())
            .await
            .unwrap();
        let service = Arc::new(EnforcementService::new(
            engine,
            Arc::new(Metrics::new().unwrap()),
        ));
        let mut edge = Edge {
            store,
            service,
            holds: Vec::new(),
            debits: Vec::new(),
            reads: AtomicU64::new(0),
        };
        for n in 0..3 {
            let usage = Some(pb::Usage {
                feature: "gen".into(),
                amount: Some(pb::usage::Amount::Quantity("2".into())),
            });
            let held = edge
                .service
                .authorize(Request::new(pb::AuthorizeRequest {
                    idempotency_key: setup_hold_key(n),
                    account_id: ACCOUNT.into(),
                    usage: usage.clone(),
                    ttl_seconds: 3_600,
                    ..Default::default()
                }))
                .await
                .unwrap()
                .into_inner();
            let Some(pb::authorize_reply::Outcome::Authorized(held)) = held.outcome else {
                panic!("setup hold refused: {held:?}")
            };
            edge.holds.push(held.hold_id);
            let key = format!("setup-debit-{n}");
            edge.service
                .debit(Request::new(pb::DebitRequest {
                    idempotency_key: key.clone(),
                    account_id: ACCOUNT.into(),
                    usage,
                    ..Default::default()
                }))
                .await
                .unwrap();
            edge.debits.push(key);
        }
        edge
    }

    async fn call(&self, call: &Call) -> Result<(), (Code, String)> {
        let service = self.service.as_ref();
        let result = match call.clone() {
            Call::Authorize(r) => service.authorize(Request::new(r)).await.map(drop),
            Call::Capture(r) => service.capture(Request::new(r)).await.map(drop),
            Call::Release(r) => service.release(Request::new(r)).await.map(drop),
            Call::Debit(r) => service.debit(Request::new(r)).await.map(drop),
            Call::Reverse(r) => service.reverse(Request::new(r)).await.map(drop),
            Call::GetBalance(r) => service.get_balance(Request::new(r)).await.map(drop),
            Call::Quote(r) => service.quote(Request::new(r)).await.map(drop),
        };
        result.map_err(|status| (status.code(), status.message().to_owned()))
    }

    /// The funded account and every other valid account named, as the region shows them, and
    /// the usage records appended since the last snapshot.
    async fn snapshot(&self, named: &[&str]) -> (Vec<AccountState>, Vec<UsageRecord>) {
        let now = Timestamp::from_millis(NOW_MS).unwrap();
        let mut accounts = Vec::new();
        for name in std::iter::once(ACCOUNT).chain(named.iter().copied()) {
            let Ok(account) = AccountId::new(name) else {
                continue;
            };
            accounts.push(AccountState {
                view: self.store.view(&account, now).await.unwrap(),
                summary: self.store.account_summary(&account).await.unwrap(),
            });
        }
        let consumer = format!("c{}", self.reads.fetch_add(1, Ordering::Relaxed));
        let records = self
            .store
            .read_usage(USAGE_GROUP, &consumer, 1_000)
            .await
            .unwrap();
        (accounts, records)
    }

    /// One call, judged, with the region read before and after.
    async fn check(&self, call: &Call) -> TestCaseResult {
        let (before, _) = self.snapshot(&[call.account_id()]).await;
        let outcome = self.call(call).await;
        let (after, written) = self.snapshot(&[call.account_id()]).await;
        judge(call, &outcome)?;
        if let Err((code, message)) = &outcome {
            prop_assert_eq!(
                &before,
                &after,
                "{:?} {:?} changed the region: {:?}",
                code,
                message,
                call
            );
            prop_assert!(
                written.is_empty(),
                "{code:?} {message:?} wrote usage {written:?}: {call:?}"
            );
        }
        Ok(())
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn runner(cases: u32) -> TestRunner {
    TestRunner::new(Config {
        cases,
        ..Config::default()
    })
}

/// Runs `CASES` generated calls against one edge, whose region carries over from call to call.
fn check_calls<S: Strategy<Value = Call>>(strategy: impl FnOnce(&Edge) -> S) {
    let runtime = runtime();
    let edge = runtime.block_on(Edge::start());
    runner(CASES)
        .run(&strategy(&edge), |call| runtime.block_on(edge.check(&call)))
        .unwrap();
}

#[test]
fn authorize() {
    check_calls(|_| authorize_calls());
}

#[test]
fn capture() {
    check_calls(|edge| capture_calls(&edge.holds));
}

#[test]
fn release() {
    check_calls(|edge| release_calls(&edge.holds));
}

#[test]
fn debit() {
    check_calls(|_| debit_calls());
}

#[test]
fn reverse() {
    check_calls(|edge| reverse_calls(&edge.debits));
}

#[test]
fn get_balance() {
    check_calls(|_| get_balance_calls());
}

#[test]
fn quote() {
    check_calls(|_| quote_calls());
}

// ---- The Enforce stream -----------------------------------------------------------------------

/// Each item answered once, under its correlation id, by the same rule as the unary call; an
/// item without a request is refused naming `request`; the stream itself never fails; and a
/// stream whose every item failed changed nothing.
#[test]
fn enforce_stream() {
    let runtime = runtime();
    let edge = runtime.block_on(Edge::start());
    let client = runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let server = EnforcementServer::from_arc(Arc::clone(&edge.service));
        // Without TCP_NODELAY each small stream waits on delayed acknowledgements.
        let incoming = TcpListenerStream::new(listener).map(|accepted| {
            let stream = accepted?;
            stream.set_nodelay(true)?;
            Ok::<_, std::io::Error>(stream)
        });
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(server)
                .serve_with_incoming(incoming),
        );
        let channel = Channel::from_shared(format!("http://{address}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        EnforcementClient::new(channel)
    });
    let item = prop_oneof![
        1 => Just(None),
        3 => authorize_calls().prop_map(Some),
        3 => capture_calls(&edge.holds).prop_map(Some),
        3 => release_calls(&edge.holds).prop_map(Some),
        3 => debit_calls().prop_map(Some),
    ];
    let batches = prop::collection::vec(item, 1..=STREAM_ITEMS_MAX);
    runner(STREAM_CASES)
        .run(&batches, |items| {
            runtime.block_on(check_stream(&edge, client.clone(), &items))
        })
        .unwrap();
}

async fn check_stream(
    edge: &Edge,
    mut client: EnforcementClient<Channel>,
    items: &[Option<Call>],
) -> TestCaseResult {
    let named: Vec<&str> = items.iter().flatten().map(Call::account_id).collect();
    let requests: Vec<pb::EnforceRequest> = (0_u64..)
        .zip(items)
        .map(|(correlation_id, item)| pb::EnforceRequest {
            correlation_id,
            request: item.as_ref().map(Call::enforce_item),
        })
        .collect();
    let (before, _) = edge.snapshot(&named).await;
    let mut replies = client
        .enforce(tokio_stream::iter(requests))
        .await
        .map_err(|status| TestCaseError::fail(format!("stream refused: {status:?}")))?
        .into_inner();
    let mut answered: Vec<Option<pb::enforce_reply::Reply>> = vec![None; items.len()];
    while let Some(reply) = replies
        .message()
        .await
        .map_err(|status| TestCaseError::fail(format!("stream failed: {status:?}")))?
    {
        let slot = usize::try_from(reply.correlation_id)
            .ok()
            .and_then(|index| answered.get_mut(index));
        let Some(slot) = slot else {
            return Err(TestCaseError::fail(format!(
                "unknown correlation id: {reply:?}"
            )));
        };
        prop_assert!(slot.is_none(), "answered twice: {:?}", reply);
        *slot = Some(
            reply
                .reply
                .ok_or_else(|| TestCaseError::fail("empty reply"))?,
        );
    }
    let (after, written) = edge.snapshot(&named).await;
    let mut all_failed = true;
    for (item, reply) in items.iter().zip(answered) {
        use pb::enforce_reply::Reply;
        let Some(reply) = reply else {
            return Err(TestCaseError::fail(format!("never answered: {item:?}")));
        };
        let outcome = match &reply {
            Reply::Error(error) => Err((Code::from(error.code), error.message.clone())),
            _ => Ok(()),
        };
        all_failed &= outcome.is_err();
        match item {
            None => prop_assert!(
                matches!(&outcome, Err((Code::InvalidArgument, m)) if names(m, "request")),
                "an item without a request: {:?}",
                outcome
            ),
            Some(call) => {
                let kind_matches = matches!(
                    (call, &reply),
                    (_, Reply::Error(_))
                        | (Call::Authorize(_), Reply::Authorize(_))
                        | (Call::Capture(_), Reply::Capture(_))
                        | (Call::Release(_), Reply::Release(_))
                        | (Call::Debit(_), Reply::Debit(_))
                );
                prop_assert!(kind_matches, "{reply:?} answers {call:?}");
                judge(call, &outcome)?;
            }
        }
    }
    if all_failed {
        prop_assert_eq!(&before, &after, "a stream of failures changed the region");
        prop_assert!(written.is_empty(), "a stream of failures wrote {written:?}");
    }
    Ok(())
}

// ---- Truncated messages -----------------------------------------------------------------------

/// Valid requests with every field set, for the wire tests.
fn valid_calls(edge: &Edge) -> Vec<Call> {
    let usage = |feature: &str, amount: pb::usage::Amount| {
        Some(pb::Usage {
            feature: feature.into(),
            amount: Some(amount),
        })
    };
    let metadata: HashMap<String, String> = [("plan".to_owned(), "pro".to_owned())].into();
    vec![
        Call::Authorize(pb::AuthorizeRequest {
            idempotency_key: "wire-hold".into(),
            account_id: ACCOUNT.into(),
            usage: usage("gen", pb::usage::Amount::Quantity("2".into())),
            ttl_seconds: 60,
            actor_id: "ada@example.com".into(),
            mode: pb::EnforcementMode::Strict.into(),
            metadata: metadata.clone(),
        }),
        Call::Capture(pb::CaptureRequest {
            idempotency_key: "wire-capture".into(),
            account_id: ACCOUNT.into(),
            hold_id: edge.holds[0].clone(),
            amount: "0.5".into(),
            authorize_key: String::new(),
        }),
        Call::Release(pb::ReleaseRequest {
            idempotency_key: "wire-release".into(),
            account_id: ACCOUNT.into(),
            hold_id: edge.holds[1].clone(),
            authorize_key: String::new(),
        }),
        Call::Debit(pb::DebitRequest {
            idempotency_key: "wire-debit".into(),
            account_id: ACCOUNT.into(),
            usage: usage("gen", pb::usage::Amount::Quantity("2".into())),
            actor_id: "ada@example.com".into(),
            mode: pb::EnforcementMode::Cached.into(),
            event_time: Some(prost_types::Timestamp {
                seconds: (NOW_MS - 1_000) / 1_000,
                nanos: 0,
            }),
            metadata,
        }),
        Call::Reverse(pb::ReverseRequest {
            idempotency_key: "wire-reverse".into(),
            account_id: ACCOUNT.into(),
            debit_id: edge.debits[0].clone(),
        }),
        Call::GetBalance(pb::GetBalanceRequest {
            account_id: ACCOUNT.into(),
            feature: "gen".into(),
        }),
        Call::Quote(pb::QuoteRequest {
            account_id: ACCOUNT.into(),
            usage: usage("lookup", pb::usage::Amount::Cost("1.5".into())),
        }),
    ]
}

/// Every request type cut at every byte: what prost decodes is judged like any other call.
#[test]
fn truncated_at_every_byte() {
    let runtime = runtime();
    runtime.block_on(async {
        let edge = Edge::start().await;
        for call in valid_calls(&edge) {
            let bytes = call.encode();
            assert!(
                call.verdict().invalid.is_empty(),
                "the uncut request is valid: {call:?}"
            );
            for cut in 0..=bytes.len() {
                if let Some(decoded) = call.decode_like(&bytes[..cut]) {
                    edge.check(&decoded)
                        .await
                        .unwrap_or_else(|error| panic!("cut at {cut}: {error}"));
                }
            }
            assert!(
                call.decode_like(&bytes).is_some(),
                "the uncut request decodes: {call:?}"
            );
        }
    });
}

fn varint(mut value: u64, out: &mut Vec<u8>) {
    while value >= 0x80 {
        out.push(u8::try_from(value & 0x7f).unwrap() | 0x80);
        value >>= 7;
    }
    out.push(u8::try_from(value).unwrap());
}

/// Bytes that look like protobuf fields (the requests' own numbers and unknown ones, as
/// varints or length-delimited payloads of hostile text, noise or a whole usage) or are plain
/// noise. Plain noise alone almost never decodes; these often do, and then replace a field of
/// the valid request (the last value of a field wins) or merge into its usage.
fn wire_garbage() -> impl Strategy<Value = Vec<u8>> {
    let payload = prop_oneof![
        id_text().prop_map(String::into_bytes),
        hostile_decimal().prop_map(String::into_bytes),
        prop::collection::vec(any::<u8>(), 0..16),
        usage().prop_map(|usage| usage.map(|u| u.encode_to_vec()).unwrap_or_default()),
    ];
    let chunk = prop_oneof![
        1 => (1_u64..12, any::<u64>()).prop_map(|(field, value)| {
            let mut bytes = Vec::new();
            varint(field << 3, &mut bytes);
            varint(value, &mut bytes);
            bytes
        }),
        3 => (1_u64..12, payload).prop_map(|(field, payload)| {
            let mut bytes = Vec::new();
            varint((field << 3) | 2, &mut bytes);
            varint(payload.len() as u64, &mut bytes);
            bytes.extend(payload);
            bytes
        }),
        1 => prop::collection::vec(any::<u8>(), 1..8),
    ];
    prop::collection::vec(chunk, 1..4).prop_map(|chunks| chunks.concat())
}

/// A valid request, whole or cut anywhere, followed by garbage decodes to an error or to some
/// request; either way the service's answer follows the rule.
#[test]
fn truncated_with_garbage() {
    let runtime = runtime();
    let edge = runtime.block_on(Edge::start());
    let calls = valid_calls(&edge);
    // Half the cases keep the whole request, so that the garbage lands on a field boundary
    // and usually decodes; a cut inside a field usually makes what follows undecodable.
    let cut = prop_oneof![Just(None), any::<usize>().prop_map(Some)];
    let cases = (0..calls.len(), cut, wire_garbage());
    runner(GARBAGE_CASES)
        .run(&cases, |(which, cut, garbage)| {
            let call = &calls[which];
            let mut bytes = call.encode();
            if let Some(cut) = cut {
                bytes.truncate(cut % (bytes.len() + 1));
            }
            bytes.extend(garbage);
            match call.decode_like(&bytes) {
                Some(decoded) => runtime.block_on(edge.check(&decoded)),
                None => Ok(()),
            }
        })
        .unwrap();
}
