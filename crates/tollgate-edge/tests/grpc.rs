//! The Enforcement service over real gRPC on 127.0.0.1, backed by a redis-server started for
//! each test: every call's success, refusal and bad-input paths, the stream, auth, metrics, and
//! what happens when Redis dies.

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{credits, seed, wait_for_lease};
use tokio::net::TcpListener;
use tollgate_core::{Credits, RegionId};
use tollgate_edge::metrics::Metrics;
use tollgate_edge::server::{serve_grpc, serve_metrics, ServeLimits};
use tollgate_edge::{EdgeSettings, Engine, SystemClock};
use tollgate_proto::pb;
use tollgate_proto::pb::enforcement_client::EnforcementClient;
use tollgate_region::{EnforcementMode, RedisRegionStore, RegionStore, RETAIN_MS_DEFAULT};
use tollgate_serve::auth::{key_digest, KeyEntry, KeyRing, Scope};
use tollgate_testkit::RedisServer;
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;
use tonic::{Code, Request};

const ENFORCE_KEY: &str = "enforce-key";
const ADMIN_KEY: &str = "admin-key";

struct Edge {
    _redis: RedisServer,
    store: Arc<RedisRegionStore>,
    address: std::net::SocketAddr,
    metrics_address: std::net::SocketAddr,
    engine: Arc<Engine<RedisRegionStore>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    serving: tokio::task::JoinHandle<()>,
}

impl Edge {
    async fn start(redis: RedisServer, settings: EdgeSettings) -> Edge {
        let store = Arc::new(
            RedisRegionStore::connect(&redis.url(), "tg:grpc", RETAIN_MS_DEFAULT)
                .await
                .unwrap(),
        );
        let engine = Arc::new(Engine::new(
            Arc::clone(&store),
            settings,
            Arc::new(SystemClock),
        ));
        let keys = Arc::new(KeyRing::new(vec![
            KeyEntry {
                name: "checkout".into(),
                digest: key_digest(ENFORCE_KEY),
                scope: Scope::Enforce,
            },
            KeyEntry {
                name: "ops".into(),
                digest: key_digest(ADMIN_KEY),
                scope: Scope::Admin,
            },
        ]));
        let metrics = Arc::new(Metrics::new().unwrap());
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let http = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let metrics_address = http.local_addr().unwrap();
        tokio::spawn(serve_metrics(
            http,
            Arc::clone(&engine),
            Arc::clone(&metrics),
            std::future::pending(),
        ));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let serving = tokio::spawn({
            let engine = Arc::clone(&engine);
            async move {
                let shutdown = async move {
                    let _ = stopped.await;
                };
                serve_grpc(
                    listener,
                    engine,
                    metrics,
                    keys,
                    ServeLimits::default(),
                    shutdown,
                )
                .await
                .unwrap();
            }
        });
        Edge {
            _redis: redis,
            store,
            address,
            metrics_address,
            engine,
            stop: Some(stop),
            serving,
        }
    }

    async fn client(
        &self,
        key: Option<&str>,
    ) -> EnforcementClient<
        tonic::service::interceptor::InterceptedService<Channel, impl tonic::service::Interceptor>,
    > {
        let channel = Channel::from_shared(format!("http://{}", self.address))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let header: Option<MetadataValue<_>> = key.map(|k| format!("Bearer {k}").parse().unwrap());
        EnforcementClient::with_interceptor(channel, move |mut request: Request<()>| {
            if let Some(header) = &header {
                request
                    .metadata_mut()
                    .insert("authorization", header.clone());
            }
            Ok(request)
        })
    }

    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = self.serving.await;
    }
}

fn settings() -> EdgeSettings {
    let mut settings = EdgeSettings::new(RegionId::new("eu").unwrap());
    settings.lease_credits = credits("20");
    settings
}

fn usage(feature: &str, quantity: &str) -> Option<pb::Usage> {
    Some(pb::Usage {
        feature: feature.into(),
        amount: Some(pb::usage::Amount::Quantity(quantity.into())),
    })
}

fn debit(key: &str, account: &str, quantity: &str) -> pb::DebitRequest {
    pb::DebitRequest {
        idempotency_key: key.into(),
        account_id: account.into(),
        usage: usage("gen", quantity),
        ..pb::DebitRequest::default()
    }
}

fn refusal_code(refusal: &pb::Refusal) -> pb::RefusalCode {
    pb::RefusalCode::try_from(refusal.code).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn debit_success_refusal_replay_and_bad_input() {
    let edge = Edge::start(RedisServer::start().unwrap(), settings()).await;
    seed(edge.store.as_ref(), "acme", "10", EnforcementMode::Strict).await;
    let mut client = edge.client(Some(ENFORCE_KEY)).await;

    let first = client
        .debit(debit("d1", "acme", "4"))
        .await
        .unwrap()
        .into_inner();
    let Some(pb::debit_reply::Outcome::Debited(done)) = first.outcome.clone() else {
        panic!("{first:?}")
    };
    assert_eq!(
        (
            done.priced.as_ref().unwrap().cost.as_str(),
            done.balance_after.as_str(),
            done.replayed
        ),
        ("2", "8", false)
    );
    assert_eq!(
        done.draws,
        [pb::Draw {
            grant_id: "g1".into(),
            amount: "2".into()
        }]
    );

    let replay = client
        .debit(debit("d1", "acme", "4"))
        .await
        .unwrap()
        .into_inner();
    let Some(pb::debit_reply::Outcome::Debited(again)) = replay.outcome else {
        panic!()
    };
    assert!(again.replayed, "a replayed Debit returns the first result");
    assert_eq!((again.debit_id, again.draws), (done.debit_id, done.draws));

    let conflict = client.debit(debit("d1", "acme", "5")).await.unwrap_err();
    assert_eq!(conflict.code(), Code::AlreadyExists);

    let refused = client
        .debit(debit("d2", "acme", "17"))
        .await
        .unwrap()
        .into_inner();
    let Some(pb::debit_reply::Outcome::Refused(refusal)) = refused.outcome else {
        panic!()
    };
    assert_eq!(refusal_code(&refusal), pb::RefusalCode::InsufficientCredits);
    assert_eq!(
        (
            refusal.cost.as_str(),
            refusal.available.as_str(),
            refusal.shortfall.as_str()
        ),
        ("8.5", "8", "0.5")
    );

    let unknown = client
        .debit(pb::DebitRequest {
            usage: usage("teleport", "1"),
            ..debit("d3", "acme", "1")
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        matches!(unknown.outcome, Some(pb::debit_reply::Outcome::Refused(r)) if refusal_code(&r) == pb::RefusalCode::UnknownFeature)
    );
    let stranger = client
        .debit(debit("d4", "nobody", "1"))
        .await
        .unwrap()
        .into_inner();
    assert!(
        matches!(stranger.outcome, Some(pb::debit_reply::Outcome::Refused(r)) if refusal_code(&r) == pb::RefusalCode::UnknownAccount)
    );

    let bad = |request: pb::DebitRequest, field: &'static str| (request, field);
    let oversized: HashMap<String, String> = (0..100)
        .map(|n| (format!("k{n}"), "v".repeat(200)))
        .collect();
    for (request, field) in [
        bad(debit("d5", "acme", "0.0000001"), "usage.quantity"),
        bad(debit("d5", "acme", "-1"), "usage.quantity"),
        bad(debit("d5", "acme", "1e3"), "usage.quantity"),
        bad(debit("", "acme", "1"), "idempotency_key"),
        bad(debit(&"k".repeat(129), "acme", "1"), "idempotency_key"),
        bad(debit("d5", "", "1"), "account_id"),
        bad(debit("d5", "has space", "1"), "account_id"),
        bad(
            pb::DebitRequest {
                usage: None,
                ..debit("d5", "acme", "1")
            },
            "usage",
        ),
        bad(
            pb::DebitRequest {
                mode: 9,
                ..debit("d5", "acme", "1")
            },
            "mode",
        ),
        bad(
            pb::DebitRequest {
                metadata: oversized,
                ..debit("d5", "acme", "1")
            },
            "metadata",
        ),
        bad(
            pb::DebitRequest {
                event_time: Some(prost_types::Timestamp {
                    seconds: 1,
                    nanos: 0,
                }),
                ..debit("d5", "acme", "1")
            },
            "event_time",
        ),
    ] {
        let error = client.debit(request).await.unwrap_err();
        assert_eq!(
            error.code(),
            Code::InvalidArgument,
            "{field}: {}",
            error.message()
        );
        assert!(
            error.message().starts_with(field),
            "{field}: {}",
            error.message()
        );
    }
    let view = edge
        .store
        .view(
            &tollgate_core::AccountId::new("acme").unwrap(),
            common::now(),
        )
        .await
        .unwrap();
    assert_eq!(
        view.pool(),
        credits("8"),
        "bad input and refusals spent nothing"
    );
    edge.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn holds_reversal_balance_and_quote() {
    let edge = Edge::start(RedisServer::start().unwrap(), settings()).await;
    seed(edge.store.as_ref(), "acme", "10", EnforcementMode::Strict).await;
    let mut client = edge.client(Some(ENFORCE_KEY)).await;
    let authorize = |key: &str, quantity: &str, ttl_seconds: u32| pb::AuthorizeRequest {
        idempotency_key: key.into(),
        account_id: "acme".into(),
        usage: usage("gen", quantity),
        ttl_seconds,
        ..pb::AuthorizeRequest::default()
    };

    let held = client
        .authorize(authorize("a1", "8", 60))
        .await
        .unwrap()
        .into_inner();
    let Some(pb::authorize_reply::Outcome::Authorized(hold)) = held.outcome else {
        panic!()
    };
    let refused = client
        .authorize(authorize("a2", "14", 60))
        .await
        .unwrap()
        .into_inner();
    assert!(
        matches!(refused.outcome, Some(pb::authorize_reply::Outcome::Refused(r)) if refusal_code(&r) == pb::RefusalCode::InsufficientCredits)
    );
    assert_eq!(
        client
            .authorize(authorize("a3", "1", 9_000_000))
            .await
            .unwrap_err()
            .code(),
        Code::InvalidArgument
    );

    let capture = |key: &str, amount: &str| pb::CaptureRequest {
        idempotency_key: key.into(),
        account_id: "acme".into(),
        hold_id: hold.hold_id.clone(),
        amount: amount.into(),
        authorize_key: String::new(),
    };
    let too_much = client
        .capture(capture("c0", "4.000001"))
        .await
        .unwrap()
        .into_inner();
    assert!(
        matches!(too_much.outcome, Some(pb::capture_reply::Outcome::Refused(r)) if refusal_code(&r) == pb::RefusalCode::CaptureExceedsHold)
    );
    let captured = client
        .capture(capture("c1", "3"))
        .await
        .unwrap()
        .into_inner();
    assert!(
        matches!(captured.outcome, Some(pb::capture_reply::Outcome::Captured(c)) if c.captured == "3" && c.released == "1")
    );
    assert_eq!(
        client
            .capture(capture("c2", "1.5.5"))
            .await
            .unwrap_err()
            .code(),
        Code::InvalidArgument
    );
    let release = pb::ReleaseRequest {
        idempotency_key: "r1".into(),
        account_id: "acme".into(),
        hold_id: hold.hold_id.clone(),
        authorize_key: String::new(),
    };
    let released = client.release(release).await.unwrap().into_inner();
    assert!(
        matches!(released.outcome, Some(pb::release_reply::Outcome::Refused(r)) if refusal_code(&r) == pb::RefusalCode::HoldAlreadyCaptured)
    );
    // A second hold, released whole: its credits are back (the balance below counts on it).
    let second = client
        .authorize(authorize("a4", "2", 60))
        .await
        .unwrap()
        .into_inner();
    let Some(pb::authorize_reply::Outcome::Authorized(second)) = second.outcome else {
        panic!()
    };
    let release_second = pb::ReleaseRequest {
        idempotency_key: "r0".into(),
        account_id: "acme".into(),
        hold_id: second.hold_id,
        authorize_key: String::new(),
    };
    let released = client.release(release_second).await.unwrap().into_inner();
    assert!(
        matches!(released.outcome, Some(pb::release_reply::Outcome::Released(r)) if r.released == "1")
    );
    let bad_release = pb::ReleaseRequest {
        idempotency_key: "r2".into(),
        account_id: "acme".into(),
        hold_id: String::new(),
        authorize_key: String::new(),
    };
    assert_eq!(
        client.release(bad_release).await.unwrap_err().code(),
        Code::InvalidArgument
    );

    client.debit(debit("d1", "acme", "2")).await.unwrap();
    let reverse = |key: &str, debit_id: &str| pb::ReverseRequest {
        idempotency_key: key.into(),
        account_id: "acme".into(),
        debit_id: debit_id.into(),
    };
    let reversed = client
        .reverse(reverse("v1", "d1"))
        .await
        .unwrap()
        .into_inner();
    assert!(
        matches!(reversed.outcome, Some(pb::reverse_reply::Outcome::Reversed(r)) if r.reversed == "1")
    );
    let unknown = client
        .reverse(reverse("v2", "never"))
        .await
        .unwrap()
        .into_inner();
    assert!(
        matches!(unknown.outcome, Some(pb::reverse_reply::Outcome::Refused(r)) if refusal_code(&r) == pb::RefusalCode::UnknownDebit)
    );
    assert_eq!(
        client.reverse(reverse("v3", "")).await.unwrap_err().code(),
        Code::InvalidArgument
    );

    let balance = client
        .get_balance(pb::GetBalanceRequest {
            account_id: "acme".into(),
            feature: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (balance.available.as_str(), balance.held.as_str()),
        ("7", "0")
    );
    assert_eq!(
        balance.balance.unwrap().balance,
        "7",
        "the account's balance: what the region holds, nothing held outside it"
    );
    let missing = client
        .get_balance(pb::GetBalanceRequest {
            account_id: "nobody".into(),
            feature: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);
    assert_eq!(
        client
            .get_balance(pb::GetBalanceRequest {
                account_id: "no/slash".into(),
                feature: String::new()
            })
            .await
            .unwrap_err()
            .code(),
        Code::InvalidArgument
    );

    let quote = client
        .quote(pb::QuoteRequest {
            account_id: "acme".into(),
            usage: usage("gen", "10"),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (
            quote.priced.unwrap().cost.as_str(),
            quote.affordable,
            quote.available.as_str()
        ),
        ("5", true, "7")
    );
    let dear = client
        .quote(pb::QuoteRequest {
            account_id: "acme".into(),
            usage: usage("gen", "100"),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!dear.affordable);
    assert_eq!(
        client
            .quote(pb::QuoteRequest {
                account_id: "acme".into(),
                usage: usage("gen", "x")
            })
            .await
            .unwrap_err()
            .code(),
        Code::InvalidArgument
    );
    edge.stop().await;
}

fn authorize_request(key: &str, quantity: &str, ttl_seconds: u32) -> pb::AuthorizeRequest {
    pb::AuthorizeRequest {
        idempotency_key: key.into(),
        account_id: "acme".into(),
        usage: usage("gen", quantity),
        ttl_seconds,
        actor_id: "ada@example.com".into(),
        ..pb::AuthorizeRequest::default()
    }
}

fn authorized(reply: pb::AuthorizeReply) -> pb::Authorized {
    match reply.outcome {
        Some(pb::authorize_reply::Outcome::Authorized(hold)) => hold,
        other => panic!("expected a hold, got {other:?}"),
    }
}

/// A retried Authorize (same key, same request, sent later) answers the first hold with its first
/// expiry and sets nothing more aside; another request under the key is a conflict. Capture and
/// Release may name the hold by the Authorize's key instead of its id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_authorize_returns_the_first_hold_and_its_key_names_it() {
    let edge = Edge::start(RedisServer::start().unwrap(), settings()).await;
    seed(edge.store.as_ref(), "acme", "10", EnforcementMode::Strict).await;
    let mut client = edge.client(Some(ENFORCE_KEY)).await;

    let first = authorized(
        client
            .authorize(authorize_request("a1", "8", 60))
            .await
            .unwrap()
            .into_inner(),
    );
    // A retry comes later, so a hold computed afresh would expire later.
    tokio::time::sleep(Duration::from_millis(20)).await;
    let retry = authorized(
        client
            .authorize(authorize_request("a1", "8", 60))
            .await
            .unwrap()
            .into_inner(),
    );
    assert!(retry.replayed && !first.replayed);
    assert_eq!(
        (&retry.hold_id, &retry.expires_at),
        (&first.hold_id, &first.expires_at)
    );
    for other in [
        authorize_request("a1", "6", 60),
        authorize_request("a1", "8", 30),
        pb::AuthorizeRequest {
            actor_id: "bob@example.com".into(),
            ..authorize_request("a1", "8", 60)
        },
    ] {
        let conflict = client.authorize(other).await.unwrap_err();
        assert_eq!(conflict.code(), Code::AlreadyExists, "{conflict:?}");
    }
    let balance = || pb::GetBalanceRequest {
        account_id: "acme".into(),
        feature: String::new(),
    };
    let reply = client.get_balance(balance()).await.unwrap().into_inner();
    assert_eq!((reply.available.as_str(), reply.held.as_str()), ("6", "4"));

    let capture = |hold_id: &str, authorize_key: &str| pb::CaptureRequest {
        idempotency_key: "c1".into(),
        account_id: "acme".into(),
        hold_id: hold_id.into(),
        amount: "1".into(),
        authorize_key: authorize_key.into(),
    };
    let captured = client
        .capture(capture("", "a1"))
        .await
        .unwrap()
        .into_inner();
    assert!(
        matches!(captured.outcome, Some(pb::capture_reply::Outcome::Captured(ref c)) if c.captured == "1" && c.released == "3"),
        "{captured:?}"
    );
    let unknown = client
        .capture(pb::CaptureRequest {
            idempotency_key: "c2".into(),
            ..capture("", "never-authorized")
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        matches!(unknown.outcome, Some(pb::capture_reply::Outcome::Refused(ref r)) if refusal_code(r) == pb::RefusalCode::UnknownHold),
        "{unknown:?}"
    );
    for (bad, field) in [
        (capture(&first.hold_id, "a1"), "authorize_key"),
        (capture("", ""), "hold_id"),
    ] {
        let status = client.capture(bad).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(status.message().starts_with(field), "{status:?}");
    }

    authorized(
        client
            .authorize(authorize_request("a2", "4", 60))
            .await
            .unwrap()
            .into_inner(),
    );
    let release = |hold_id: &str, authorize_key: &str| pb::ReleaseRequest {
        idempotency_key: "r1".into(),
        account_id: "acme".into(),
        hold_id: hold_id.into(),
        authorize_key: authorize_key.into(),
    };
    for (bad, field) in [
        (release("h.1", "a2"), "authorize_key"),
        (release("", ""), "hold_id"),
    ] {
        let status = client.release(bad).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(status.message().starts_with(field), "{status:?}");
    }
    let released = client
        .release(release("", "a2"))
        .await
        .unwrap()
        .into_inner();
    assert!(
        matches!(released.outcome, Some(pb::release_reply::Outcome::Released(ref r)) if r.released == "2"),
        "{released:?}"
    );
    let reply = client.get_balance(balance()).await.unwrap().into_inner();
    assert_eq!((reply.available.as_str(), reply.held.as_str()), ("9", "0"));
    edge.stop().await;
}

/// What a node lists over server reflection, asked with `v1` and with `v1alpha`.
async fn reflected_services(address: std::net::SocketAddr) -> (Vec<String>, Vec<String>) {
    use tonic_reflection::pb::{v1, v1alpha};
    let channel = Channel::from_shared(format!("http://{address}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let request = v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(v1::server_reflection_request::MessageRequest::ListServices(
            String::new(),
        )),
    };
    let reply = v1::server_reflection_client::ServerReflectionClient::new(channel.clone())
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner()
        .message()
        .await
        .unwrap()
        .expect("one v1 reply");
    let Some(v1::server_reflection_response::MessageResponse::ListServicesResponse(list)) =
        reply.message_response
    else {
        panic!("a v1 service list: {reply:?}");
    };
    let listed_v1 = list.service.into_iter().map(|s| s.name).collect();
    let request = v1alpha::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            v1alpha::server_reflection_request::MessageRequest::ListServices(String::new()),
        ),
    };
    let reply = v1alpha::server_reflection_client::ServerReflectionClient::new(channel)
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner()
        .message()
        .await
        .unwrap()
        .expect("one v1alpha reply");
    let Some(v1alpha::server_reflection_response::MessageResponse::ListServicesResponse(list)) =
        reply.message_response
    else {
        panic!("a v1alpha service list: {reply:?}");
    };
    (
        listed_v1,
        list.service.into_iter().map(|s| s.name).collect(),
    )
}

/// Reflection lists every service the edge answers, Envoy's rate-limit service included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflection_lists_every_service_the_edge_answers() {
    let edge = Edge::start(RedisServer::start().unwrap(), settings()).await;
    let (listed_v1, listed_v1alpha) = reflected_services(edge.address).await;
    for listed in [&listed_v1, &listed_v1alpha] {
        for service in [
            "tollgate.v1.Enforcement",
            "envoy.service.ratelimit.v3.RateLimitService",
            "grpc.health.v1.Health",
        ] {
            assert!(
                listed.iter().any(|name| name == service),
                "{service}: {listed:?}"
            );
        }
    }
    edge.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_enforce_stream_answers_every_request_by_correlation_id() {
    let edge = Edge::start(RedisServer::start().unwrap(), settings()).await;
    seed(edge.store.as_ref(), "acme", "100", EnforcementMode::Cached).await;
    let mut client = edge.client(Some(ENFORCE_KEY)).await;
    let mut requests: Vec<pb::EnforceRequest> = (0..50)
        .map(|n| pb::EnforceRequest {
            correlation_id: n,
            request: Some(pb::enforce_request::Request::Debit(debit(
                &format!("s{n}"),
                "acme",
                "2",
            ))),
        })
        .collect();
    requests.push(pb::EnforceRequest {
        correlation_id: 999,
        request: Some(pb::enforce_request::Request::Debit(debit(
            "bad",
            "acme",
            "0.0000001",
        ))),
    });
    requests.push(pb::EnforceRequest {
        correlation_id: 1000,
        request: None,
    });
    let replies: Vec<pb::EnforceReply> = {
        use tokio_stream::StreamExt;
        let stream = client
            .enforce(tokio_stream::iter(requests))
            .await
            .unwrap()
            .into_inner();
        stream.collect::<Result<Vec<_>, _>>().await.unwrap()
    };
    assert_eq!(
        replies.len(),
        52,
        "one reply per request, and the stream stays open after bad ones"
    );
    let by_id: HashMap<u64, &pb::EnforceReply> =
        replies.iter().map(|r| (r.correlation_id, r)).collect();
    for n in 0..50 {
        assert!(matches!(
            &by_id[&n].reply,
            Some(pb::enforce_reply::Reply::Debit(pb::DebitReply {
                outcome: Some(pb::debit_reply::Outcome::Debited(_))
            }))
        ));
    }
    for id in [999, 1000] {
        let Some(pb::enforce_reply::Reply::Error(error)) = &by_id[&id].reply else {
            panic!("{id}")
        };
        assert_eq!(error.code, Code::InvalidArgument as i32);
    }
    edge.engine.leases().flush_dirty().await;
    let view = edge
        .store
        .view(
            &tollgate_core::AccountId::new("acme").unwrap(),
            common::now(),
        )
        .await
        .unwrap();
    assert_eq!(
        Credits::checked_sum([view.pool(), view.leased]).unwrap(),
        credits("50"),
        "fifty decisions of one credit each"
    );
    edge.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_and_scopes_guard_the_calls_and_health_is_open() {
    let edge = Edge::start(RedisServer::start().unwrap(), settings()).await;
    seed(edge.store.as_ref(), "acme", "10", EnforcementMode::Strict).await;
    for (key, code) in [
        (None, Code::Unauthenticated),
        (Some("wrong"), Code::Unauthenticated),
        (Some(ADMIN_KEY), Code::PermissionDenied),
    ] {
        let mut client = edge.client(key).await;
        assert_eq!(
            client
                .debit(debit("d1", "acme", "1"))
                .await
                .unwrap_err()
                .code(),
            code,
            "{key:?}"
        );
    }
    let channel = Channel::from_shared(format!("http://{}", edge.address))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let status = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "tollgate.v1.Enforcement".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        status.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );

    let mut client = edge.client(Some(ENFORCE_KEY)).await;
    client.debit(debit("d1", "acme", "1")).await.unwrap();
    let text = metrics_text(edge.metrics_address).await;
    assert!(
        text.contains(r#"tollgate_edge_decisions_total{outcome="allowed",rpc="debit"} 1"#),
        "{text}"
    );
    assert!(text.contains("tollgate_edge_decision_seconds_bucket"));
    assert!(text.contains("tollgate_edge_price_book_generation 1"));
    edge.stop().await;
}

async fn metrics_text(address: std::net::SocketAddr) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: edge\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut text = String::new();
    stream.read_to_string(&mut text).await.unwrap();
    text
}

/// Kill the test's redis-server mid-test: strict calls get UNAVAILABLE within the timeout,
/// cached calls keep being served from the lease, and after Redis returns no acknowledged
/// strict debit is missing from the usage stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_redis_fails_strict_closed_and_cached_keeps_serving() {
    let edge = Edge::start(RedisServer::start().unwrap(), settings()).await;
    let account = seed(edge.store.as_ref(), "acme", "100", EnforcementMode::Strict).await;
    edge.store.create_usage_group("audit").await.unwrap();
    let mut client = edge.client(Some(ENFORCE_KEY)).await;
    let cached = |key: &str| pb::DebitRequest {
        mode: pb::EnforcementMode::Cached as i32,
        ..debit(key, "acme", "2")
    };
    let mut acknowledged = Vec::new();
    for n in 0..10 {
        let reply = client
            .debit(debit(&format!("strict-{n}"), "acme", "2"))
            .await
            .unwrap()
            .into_inner();
        assert!(matches!(
            reply.outcome,
            Some(pb::debit_reply::Outcome::Debited(_))
        ));
        acknowledged.push(format!("strict-{n}"));
    }
    client.debit(cached("warm-up")).await.unwrap();
    wait_for_lease(&edge.engine, &account).await;

    let mut edge = edge;
    edge._redis.kill();
    let started = Instant::now();
    let strict = client
        .debit(debit("strict-while-down", "acme", "2"))
        .await
        .unwrap_err();
    assert_eq!(strict.code(), Code::Unavailable, "{}", strict.message());
    println!(
        "strict UNAVAILABLE after {} ms (store timeout {} ms)",
        started.elapsed().as_millis(),
        edge.engine.settings().store_timeout_ms
    );
    for n in 0..5 {
        let reply = client
            .debit(cached(&format!("cached-while-down-{n}")))
            .await
            .unwrap()
            .into_inner();
        assert!(
            matches!(reply.outcome, Some(pb::debit_reply::Outcome::Debited(_))),
            "served from the lease"
        );
    }

    edge._redis.restart().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while edge.engine.leases().pending() > 0 && Instant::now() < deadline {
        edge.engine.leases().flush_dirty().await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut keys = std::collections::BTreeSet::new();
    for _ in 0..100 {
        let records = edge
            .store
            .read_usage("audit", "auditor", 500)
            .await
            .unwrap();
        if records.is_empty() {
            break;
        }
        edge.store
            .ack_usage(
                "audit",
                &records.iter().map(|r| r.id.clone()).collect::<Vec<_>>(),
            )
            .await
            .unwrap();
        keys.extend(records.into_iter().map(|r| r.key.to_string()));
    }
    for key in &acknowledged {
        assert!(
            keys.contains(key),
            "acknowledged strict debit {key} is missing after the restart"
        );
    }
    assert!(
        (0..5).all(|n| keys.contains(&format!("cached-while-down-{n}"))),
        "cached decisions reached the stream once Redis was back"
    );
    assert!(!keys.contains("strict-while-down"));
    edge.stop().await;
}
