//! Envoy's rate-limit service (the adapter the edge serves), asked for feature `chat`.

use envoy_types::pb::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::Entry;
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient;
use envoy_types::pb::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
use tonic::transport::Channel;

use super::grpc::keyed;

/// `ShouldRateLimit` for `hits` of feature `chat` by `account`, presenting `key`.
pub async fn should_rate_limit_chat(
    channel: Channel,
    key: &str,
    account: &str,
    hits: u64,
) -> RateLimitResponse {
    let entry = |key: &str, value: &str| Entry {
        key: key.into(),
        value: value.into(),
    };
    RateLimitServiceClient::new(channel)
        .should_rate_limit(keyed(
            RateLimitRequest {
                domain: "tollgate".into(),
                descriptors: vec![RateLimitDescriptor {
                    entries: vec![entry("account", account), entry("feature", "chat")],
                    hits_addend: Some(envoy_types::pb::google::protobuf::UInt64Value {
                        value: hits,
                    }),
                    ..RateLimitDescriptor::default()
                }],
                hits_addend: 0,
            },
            key,
        ))
        .await
        .unwrap()
        .into_inner()
}

/// The `x-tollgate` header the reply adds.
pub fn tollgate_note(reply: &RateLimitResponse) -> &str {
    reply
        .response_headers_to_add
        .iter()
        .find(|header| header.key == "x-tollgate")
        .unwrap_or_else(|| panic!("no x-tollgate header: {reply:?}"))
        .value
        .as_str()
}
