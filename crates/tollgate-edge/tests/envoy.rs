//! Envoy's rate limit protocol over real gRPC on 127.0.0.1, backed by a real redis-server.

mod common;

use common::seed;

use std::sync::Arc;

use envoy_types::pb::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::Entry;
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::Code;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_server::RateLimitServiceServer;
use envoy_types::pb::envoy::service::ratelimit::v3::RateLimitRequest;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tollgate_core::{Credits, RegionId};
use tollgate_edge::envoy::{DescriptorKeys, EnvoyRateLimit};
use tollgate_edge::{Clock, EdgeSettings, Engine, SystemClock};
use tollgate_region::{EnforcementMode, RedisRegionStore, RegionStore, RETAIN_MS_DEFAULT};
use tollgate_testkit::RedisServer;

fn descriptor(pairs: &[(&str, &str)], hits: Option<u64>) -> RateLimitDescriptor {
    RateLimitDescriptor {
        entries: pairs
            .iter()
            .map(|(k, v)| Entry {
                key: (*k).into(),
                value: (*v).into(),
            })
            .collect(),
        hits_addend: hits.map(|value| envoy_types::pb::google::protobuf::UInt64Value { value }),
        ..RateLimitDescriptor::default()
    }
}

#[tokio::test]
async fn envoy_gets_ok_until_credits_run_out_then_over_limit() {
    let server = RedisServer::start().unwrap();
    let store = Arc::new(
        RedisRegionStore::connect(&server.url(), "tg:envoy", RETAIN_MS_DEFAULT)
            .await
            .unwrap(),
    );
    let account = seed(store.as_ref(), "acme", "5", EnforcementMode::Strict).await;
    let engine = Arc::new(Engine::new(
        Arc::clone(&store),
        EdgeSettings::new(RegionId::new("eu").unwrap()),
        Arc::new(SystemClock),
    ));
    engine
        .catalogue()
        .reload_prices(store.as_ref())
        .await
        .unwrap();
    let service = EnvoyRateLimit::new(Arc::clone(&engine), DescriptorKeys::default());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let serving = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(RateLimitServiceServer::new(service))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    let mut client = RateLimitServiceClient::connect(format!("http://{address}"))
        .await
        .unwrap();
    let ask = |hits: u32, request_id: Option<&str>| {
        let mut pairs = vec![("account", "acme"), ("feature", "api_call")];
        if let Some(id) = request_id {
            pairs.push(("request_id", id));
        }
        RateLimitRequest {
            domain: "tollgate".into(),
            descriptors: vec![descriptor(&pairs, None)],
            hits_addend: hits,
        }
    };

    let mut codes = Vec::new();
    for n in 0..3 {
        let reply = client
            .should_rate_limit(ask(2, Some(&format!("req-{n}"))))
            .await
            .unwrap()
            .into_inner();
        codes.push(Code::try_from(reply.overall_code).unwrap());
    }
    assert_eq!(
        codes,
        [Code::Ok, Code::Ok, Code::OverLimit],
        "2 + 2 fit in 5 credits, the third 2 does not"
    );
    let retry = client
        .should_rate_limit(ask(2, Some("req-0")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        Code::try_from(retry.overall_code).unwrap(),
        Code::Ok,
        "a retried request id is answered as first, not charged again"
    );
    let last = client
        .should_rate_limit(ask(1, None))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(Code::try_from(last.overall_code).unwrap(), Code::Ok);
    let empty = client
        .should_rate_limit(ask(1, None))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(Code::try_from(empty.overall_code).unwrap(), Code::OverLimit);
    assert!(empty
        .response_headers_to_add
        .iter()
        .any(|h| h.key == "x-tollgate-refusal" && h.value.starts_with("insufficient_credits")));

    // A descriptor that is not Tollgate's passes; a bad account id is INVALID_ARGUMENT naming it.
    let foreign = RateLimitRequest {
        domain: "other".into(),
        descriptors: vec![descriptor(&[("path", "/x")], None)],
        hits_addend: 1,
    };
    assert_eq!(
        Code::try_from(
            client
                .should_rate_limit(foreign)
                .await
                .unwrap()
                .into_inner()
                .overall_code
        )
        .unwrap(),
        Code::Ok
    );
    let bad = RateLimitRequest {
        domain: "tollgate".into(),
        descriptors: vec![descriptor(
            &[("account", "no spaces"), ("feature", "api_call")],
            Some(1),
        )],
        hits_addend: 0,
    };
    let error = client.should_rate_limit(bad).await.unwrap_err();
    assert_eq!(error.code(), tonic::Code::InvalidArgument);
    assert!(
        error.message().contains("descriptors[0].account"),
        "{}",
        error.message()
    );
    assert_eq!(
        store
            .view(&account, SystemClock.now())
            .await
            .unwrap()
            .pool(),
        Credits::ZERO
    );
    serving.abort();
}
