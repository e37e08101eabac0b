//! Bytes off the wire into the real Enforcement service: the first byte picks the request type
//! (`Authorize`, `Capture`, `Release`, `Debit`, `Reverse`, `GetBalance`, `Quote`), the rest is
//! decoded by prost and handed to `EnforcementService` of `tollgate-edge` over a fresh
//! in-memory region (`src/edge.rs`).
//!
//! A call either answers (a decision or a typed refusal, every amount in it a decimal that
//! reads back as credits) or fails with `INVALID_ARGUMENT` naming a field of the request, an
//! idempotency conflict naming `idempotency_key`, or, for `GetBalance` and `Quote`, `NOT_FOUND`
//! naming the unknown account or feature. A failed call leaves the account's regional state
//! as it was and writes no usage record. Nothing panics.

#![no_main]

use libfuzzer_sys::fuzz_target;
use prost::Message;
use tollgate_core::{Credits, Rate};
use tollgate_fuzz::contract::{assert_names_field, assert_refusal_text};
use tollgate_fuzz::edge::{runtime, Edge};
use tollgate_fuzz::ENFORCEMENT_REQUESTS;
use tollgate_proto::pb;
use tollgate_proto::pb::enforcement_server::Enforcement;
use tonic::{Code, Request, Status};

fuzz_target!(|data: &[u8]| {
    let Some((&pick, bytes)) = data.split_first() else {
        return;
    };
    let name = ENFORCEMENT_REQUESTS[usize::from(pick) % ENFORCEMENT_REQUESTS.len()];
    runtime().block_on(call(name, bytes));
});

async fn call(name: &'static str, bytes: &[u8]) {
    macro_rules! decoded {
        ($type:ty) => {
            match <$type>::decode(bytes) {
                Ok(request) => request,
                Err(_) => return,
            }
        };
    }
    let mut edge = Edge::start().await;
    let before = edge.snapshot().await;
    let service = &edge.service;
    let result: Result<(), Status> = match name {
        "AuthorizeRequest" => {
            let request = decoded!(pb::AuthorizeRequest);
            service.authorize(Request::new(request)).await.map(|reply| {
                match reply.into_inner().outcome.expect("an authorize outcome") {
                    pb::authorize_reply::Outcome::Authorized(done) => {
                        priced(done.priced.as_ref());
                        assert!(done.expires_at.is_some());
                    }
                    pb::authorize_reply::Outcome::Refused(refused) => refusal(&refused),
                }
            })
        }
        "CaptureRequest" => {
            let request = decoded!(pb::CaptureRequest);
            service.capture(Request::new(request)).await.map(|reply| {
                match reply.into_inner().outcome.expect("a capture outcome") {
                    pb::capture_reply::Outcome::Captured(done) => {
                        credits(&done.captured);
                        credits(&done.released);
                    }
                    pb::capture_reply::Outcome::Refused(refused) => refusal(&refused),
                }
            })
        }
        "ReleaseRequest" => {
            let request = decoded!(pb::ReleaseRequest);
            service.release(Request::new(request)).await.map(|reply| {
                match reply.into_inner().outcome.expect("a release outcome") {
                    pb::release_reply::Outcome::Released(done) => {
                        credits(&done.released);
                    }
                    pb::release_reply::Outcome::Refused(refused) => refusal(&refused),
                }
            })
        }
        "DebitRequest" => {
            let request = decoded!(pb::DebitRequest);
            service.debit(Request::new(request)).await.map(|reply| {
                match reply.into_inner().outcome.expect("a debit outcome") {
                    pb::debit_reply::Outcome::Debited(done) => {
                        priced(done.priced.as_ref());
                        for draw in &done.draws {
                            assert!(credits(&draw.amount).is_positive(), "{draw:?}");
                        }
                        credits(&done.overdraft);
                        credits(&done.balance_after);
                    }
                    pb::debit_reply::Outcome::Refused(refused) => refusal(&refused),
                }
            })
        }
        "ReverseRequest" => {
            let request = decoded!(pb::ReverseRequest);
            service.reverse(Request::new(request)).await.map(|reply| {
                match reply.into_inner().outcome.expect("a reverse outcome") {
                    pb::reverse_reply::Outcome::Reversed(done) => {
                        credits(&done.reversed);
                    }
                    pb::reverse_reply::Outcome::Refused(refused) => refusal(&refused),
                }
            })
        }
        "GetBalanceRequest" => {
            let request = decoded!(pb::GetBalanceRequest);
            service
                .get_balance(Request::new(request))
                .await
                .map(|reply| {
                    let reply = reply.into_inner();
                    let balance = reply.balance.expect("a balance");
                    credits(&balance.balance);
                    credits(&balance.debt);
                    credits(&balance.overdraft_limit);
                    credits(&reply.available);
                    credits(&reply.held);
                })
        }
        "QuoteRequest" => {
            let request = decoded!(pb::QuoteRequest);
            service.quote(Request::new(request)).await.map(|reply| {
                let reply = reply.into_inner();
                priced(reply.priced.as_ref());
                credits(&reply.available);
            })
        }
        other => unreachable!("no handler for {other}"),
    };
    let Err(status) = result else {
        return;
    };
    judge(name, &status);
    assert_eq!(
        before,
        edge.snapshot().await,
        "{name} failed ({status:?}) and changed the region"
    );
    let written = edge.usage_since_last_read().await;
    assert!(
        written.is_empty(),
        "{name} failed ({status:?}) and wrote usage: {written:?}"
    );
}

/// The codes a call may fail with, and what each must name.
fn judge(name: &str, status: &Status) {
    let message = status.message();
    match status.code() {
        Code::AlreadyExists => {
            assert!(
                message.starts_with("idempotency_key: "),
                "{name} conflict {message:?}"
            );
        }
        Code::NotFound if matches!(name, "GetBalanceRequest" | "QuoteRequest") => {
            assert_refusal_text(name, message);
        }
        code => assert_names_field(name, code, message),
    }
}

/// An amount the edge writes: a decimal that reads back as itself.
fn credits(text: &str) -> Credits {
    let amount =
        Credits::parse(text).unwrap_or_else(|e| panic!("amount {text:?} on the wire: {e}"));
    assert_eq!(amount.to_string(), text, "amount not in canonical form");
    amount
}

fn priced(priced: Option<&pb::PricedCost>) {
    let priced = priced.expect("a priced cost");
    assert!(!credits(&priced.cost).is_negative(), "{priced:?}");
    if !priced.rate.is_empty() {
        Rate::parse(&priced.rate)
            .unwrap_or_else(|e| panic!("rate {:?} on the wire: {e}", priced.rate));
    }
}

fn refusal(refused: &pb::Refusal) {
    assert!(!refused.message.is_empty(), "{refused:?}");
    for text in [&refused.cost, &refused.available, &refused.shortfall] {
        if !text.is_empty() {
            credits(text);
        }
    }
}
