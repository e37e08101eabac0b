//! The inputs each target's corpus starts from: valid requests as a caller sends them, encoded
//! as the target reads them (one byte picking the request type, then the message). Written
//! into `fuzz/corpus/<target>/` by `examples/seeds.rs`, which `fuzz/run` calls.

use prost::Message;
use tollgate_proto::pb;

use crate::edge::{ACCOUNT, SETUP_DEBIT_KEY};
use crate::{ADMIN_REQUESTS, ENFORCEMENT_REQUESTS};

/// One seed: a file name and its bytes.
pub type Seed = (String, Vec<u8>);

fn picked(requests: &[&str], name: &str, message: &impl Message) -> Seed {
    let pick = requests
        .iter()
        .position(|r| *r == name)
        .unwrap_or_else(|| panic!("{name} is not a target's request"));
    let mut bytes = vec![u8::try_from(pick).expect("fewer than 256 request types")];
    bytes.extend(message.encode_to_vec());
    (format!("seed-{name}"), bytes)
}

fn at(seconds: i64) -> Option<prost_types::Timestamp> {
    Some(prost_types::Timestamp { seconds, nanos: 0 })
}

pub fn admin_requests() -> Vec<Seed> {
    let metadata = || [("plan".to_owned(), "pro".to_owned())].into();
    vec![
        picked(
            &ADMIN_REQUESTS,
            "CreateAccountRequest",
            &pb::CreateAccountRequest {
                idempotency_key: "k-1".into(),
                account_id: ACCOUNT.into(),
                overdraft_limit: "25.5".into(),
                metadata: metadata(),
            },
        ),
        picked(
            &ADMIN_REQUESTS,
            "UpdateAccountRequest",
            &pb::UpdateAccountRequest {
                idempotency_key: "k-2".into(),
                account_id: ACCOUNT.into(),
                overdraft_limit: Some("0".into()),
                metadata: metadata(),
                replace_metadata: true,
                ..Default::default()
            },
        ),
        picked(
            &ADMIN_REQUESTS,
            "IssueGrantRequest",
            &pb::IssueGrantRequest {
                idempotency_key: "k-3".into(),
                account_id: ACCOUNT.into(),
                grant_id: "g1".into(),
                amount: "12.5".into(),
                source: pb::GrantSource::Purchase.into(),
                priority: Some(10),
                effective_at: at(1_700_000_000),
                expires_at: at(1_800_000_000),
                scope: Some(pb::Scope {
                    features: vec!["gen".into(), "lookup".into()],
                }),
                cost_basis: Some(pb::Money {
                    amount: "9.99".into(),
                    currency: "EUR".into(),
                }),
                external_ref: "order-7".into(),
                memo: "a purchase".into(),
                metadata: metadata(),
            },
        ),
        picked(
            &ADMIN_REQUESTS,
            "VoidGrantRequest",
            &pb::VoidGrantRequest {
                idempotency_key: "k-4".into(),
                account_id: ACCOUNT.into(),
                grant_id: "g1".into(),
                memo: "refunded".into(),
            },
        ),
        picked(
            &ADMIN_REQUESTS,
            "ExpireGrantRequest",
            &pb::ExpireGrantRequest {
                idempotency_key: "k-5".into(),
                account_id: ACCOUNT.into(),
                grant_id: "g1".into(),
                memo: String::new(),
            },
        ),
        picked(
            &ADMIN_REQUESTS,
            "RefundRequest",
            &pb::RefundRequest {
                idempotency_key: "k-6".into(),
                account_id: ACCOUNT.into(),
                debit_id: "d-1".into(),
                amount: "0.000001".into(),
                refund_grant_id: "r1".into(),
                refund_grant_expires_at: at(1_800_000_000),
                memo: "ticket 12".into(),
            },
        ),
        picked(
            &ADMIN_REQUESTS,
            "AdjustRequest",
            &pb::AdjustRequest {
                idempotency_key: "k-7".into(),
                account_id: ACCOUNT.into(),
                amount: "-2.5".into(),
                grant_id: "g1".into(),
                memo: "ticket 13".into(),
                beyond_overdraft: false,
            },
        ),
        picked(
            &ADMIN_REQUESTS,
            "ListEntriesRequest",
            &pb::ListEntriesRequest {
                account_id: ACCOUNT.into(),
                kinds: vec![pb::EntryKind::Debit.into(), pb::EntryKind::Grant.into()],
                grant_id: "g1".into(),
                debit_id: "d-1".into(),
                from: at(0),
                until: at(253_402_300_799),
                page_size: 50,
                page_token: "t".into(),
            },
        ),
        picked(
            &ADMIN_REQUESTS,
            "ListGrantsRequest",
            &pb::ListGrantsRequest {
                account_id: ACCOUNT.into(),
                open_only: true,
                page_size: 10,
                page_token: String::new(),
            },
        ),
    ]
}

pub fn amounts() -> Vec<Seed> {
    [
        "0",
        "12.5",
        "-0.000001",
        "0.1234560",
        "9223372036854.775807",
        "-9223372036854.775808",
        "1000000000000",
        "0.000000000001",
        "0.0000015*3",
        "1000000000*1000000000000",
    ]
    .iter()
    .enumerate()
    .map(|(n, text)| (format!("seed-{n}"), text.as_bytes().to_vec()))
    .collect()
}

/// `hold_id` is the setup hold's, which depends on the engine (`Edge::start` reports it).
pub fn enforcement_requests(hold_id: &str) -> Vec<Seed> {
    let usage = |amount: pb::usage::Amount| {
        Some(pb::Usage {
            feature: "gen".into(),
            amount: Some(amount),
        })
    };
    let quantity = |text: &str| usage(pb::usage::Amount::Quantity(text.into()));
    let cost = |text: &str| usage(pb::usage::Amount::Cost(text.into()));
    let requests = &ENFORCEMENT_REQUESTS;
    vec![
        picked(
            requests,
            "AuthorizeRequest",
            &pb::AuthorizeRequest {
                idempotency_key: "k-1".into(),
                account_id: ACCOUNT.into(),
                usage: quantity("3"),
                ttl_seconds: 60,
                actor_id: "ann@example.com".into(),
                ..Default::default()
            },
        ),
        picked(
            requests,
            "CaptureRequest",
            &pb::CaptureRequest {
                idempotency_key: "k-2".into(),
                account_id: ACCOUNT.into(),
                hold_id: hold_id.into(),
                amount: "0.5".into(),
                authorize_key: String::new(),
            },
        ),
        picked(
            requests,
            "ReleaseRequest",
            &pb::ReleaseRequest {
                idempotency_key: "k-3".into(),
                account_id: ACCOUNT.into(),
                hold_id: hold_id.into(),
                authorize_key: String::new(),
            },
        ),
        picked(
            requests,
            "DebitRequest",
            &pb::DebitRequest {
                idempotency_key: "k-4".into(),
                account_id: ACCOUNT.into(),
                usage: cost("1.25"),
                event_time: at(1_700_000_000),
                metadata: [("request".to_owned(), "r-9".to_owned())].into(),
                ..Default::default()
            },
        ),
        picked(
            requests,
            "ReverseRequest",
            &pb::ReverseRequest {
                idempotency_key: "k-5".into(),
                account_id: ACCOUNT.into(),
                debit_id: SETUP_DEBIT_KEY.into(),
            },
        ),
        picked(
            requests,
            "GetBalanceRequest",
            &pb::GetBalanceRequest {
                account_id: ACCOUNT.into(),
                feature: "gen".into(),
            },
        ),
        picked(
            requests,
            "QuoteRequest",
            &pb::QuoteRequest {
                account_id: ACCOUNT.into(),
                usage: quantity("2000000"),
            },
        ),
    ]
}

#[cfg(test)]
mod tests {
    use tollgate_core::command::{
        Adjust, CloseGrant, CreateAccount, IssueGrant, Refund, UpdateAccount,
    };
    use tollgate_core::{Quantity, Rate};
    use tollgate_proto::decode::{EntryQuery, GrantQuery};
    use tollgate_proto::pb::enforcement_server::Enforcement;
    use tonic::Request;

    use super::*;
    use crate::edge::{runtime, Edge};

    fn body<M: Message + Default>(seed: &Seed) -> M {
        M::decode(&seed.1[1..]).expect("a seed decodes")
    }

    /// Every Admin seed is a request its conversion accepts, so fuzzing starts past the checks.
    #[test]
    fn admin_seeds_convert() {
        for seed in admin_requests() {
            let name = ADMIN_REQUESTS[usize::from(seed.1[0])];
            let accepted = match name {
                "CreateAccountRequest" => {
                    CreateAccount::try_from(body::<pb::CreateAccountRequest>(&seed)).is_ok()
                }
                "UpdateAccountRequest" => {
                    UpdateAccount::try_from(&body::<pb::UpdateAccountRequest>(&seed)).is_ok()
                }
                "IssueGrantRequest" => {
                    IssueGrant::try_from(body::<pb::IssueGrantRequest>(&seed)).is_ok()
                }
                "VoidGrantRequest" => {
                    CloseGrant::try_from(body::<pb::VoidGrantRequest>(&seed)).is_ok()
                }
                "ExpireGrantRequest" => {
                    CloseGrant::try_from(body::<pb::ExpireGrantRequest>(&seed)).is_ok()
                }
                "RefundRequest" => Refund::try_from(body::<pb::RefundRequest>(&seed)).is_ok(),
                "AdjustRequest" => Adjust::try_from(body::<pb::AdjustRequest>(&seed)).is_ok(),
                "ListEntriesRequest" => {
                    EntryQuery::try_from(body::<pb::ListEntriesRequest>(&seed)).is_ok()
                }
                "ListGrantsRequest" => {
                    GrantQuery::try_from(body::<pb::ListGrantsRequest>(&seed)).is_ok()
                }
                other => panic!("no conversion for {other}"),
            };
            assert!(accepted, "{}", seed.0);
        }
    }

    #[test]
    fn amount_seeds_parse() {
        for (name, bytes) in amounts() {
            let text = std::str::from_utf8(&bytes).expect("utf-8");
            let parsed = match text.split_once('*') {
                Some((rate, quantity)) => {
                    Rate::parse(rate).is_ok() && Quantity::parse(quantity).is_ok()
                }
                None => tollgate_core::Credits::parse(text).is_ok() || Rate::parse(text).is_ok(),
            };
            assert!(parsed, "{name}: {text:?}");
        }
    }

    /// Every Enforcement seed is answered with a decision, not a refusal or an error, on the
    /// edge the target starts for each input.
    #[test]
    fn enforcement_seeds_are_decided() {
        runtime().block_on(async {
            let hold_id = Edge::start().await.hold_id;
            for seed in enforcement_requests(&hold_id) {
                let edge = Edge::start().await;
                let service = &edge.service;
                let decided = match ENFORCEMENT_REQUESTS[usize::from(seed.1[0])] {
                    "AuthorizeRequest" => matches!(
                        service
                            .authorize(Request::new(body(&seed)))
                            .await
                            .map(|r| r.into_inner().outcome),
                        Ok(Some(pb::authorize_reply::Outcome::Authorized(_)))
                    ),
                    "CaptureRequest" => matches!(
                        service
                            .capture(Request::new(body(&seed)))
                            .await
                            .map(|r| r.into_inner().outcome),
                        Ok(Some(pb::capture_reply::Outcome::Captured(_)))
                    ),
                    "ReleaseRequest" => matches!(
                        service
                            .release(Request::new(body(&seed)))
                            .await
                            .map(|r| r.into_inner().outcome),
                        Ok(Some(pb::release_reply::Outcome::Released(_)))
                    ),
                    "DebitRequest" => matches!(
                        service
                            .debit(Request::new(body(&seed)))
                            .await
                            .map(|r| r.into_inner().outcome),
                        Ok(Some(pb::debit_reply::Outcome::Debited(_)))
                    ),
                    "ReverseRequest" => matches!(
                        service
                            .reverse(Request::new(body(&seed)))
                            .await
                            .map(|r| r.into_inner().outcome),
                        Ok(Some(pb::reverse_reply::Outcome::Reversed(_)))
                    ),
                    "GetBalanceRequest" => {
                        service.get_balance(Request::new(body(&seed))).await.is_ok()
                    }
                    "QuoteRequest" => service.quote(Request::new(body(&seed))).await.is_ok(),
                    other => panic!("no handler for {other}"),
                };
                assert!(decided, "{}", seed.0);
            }
        });
    }
}
