//! Envoy's rate limit protocol (`envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit`)
//! answered with credits, so a gateway that speaks it enforces Tollgate balances with no code.
//!
//! Each descriptor whose entries name an account and a feature is one debit of `hits_addend`
//! units (the descriptor's, else the request's, else 1), priced by the price book. The answer is
//! OVER_LIMIT when any such descriptor is refused. Descriptors that name no account and feature
//! are not Tollgate's and answer OK. An entry `request_id` (Envoy's `x-request-id`, through a
//! `request_headers` action) becomes the idempotency key, so Envoy's retries are charged once.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use envoy_types::pb::envoy::config::core::v3::HeaderValue;
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::{Code, DescriptorStatus};
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_server::RateLimitService;
use envoy_types::pb::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
use tollgate_core::{AccountId, FeatureKey, IdempotencyKey, Quantity};
use tollgate_region::RegionStore;
use tonic::{Request, Response, Status};

use crate::engine::{DebitRequest, Decision, Engine, Refused, Spend};
use crate::error::EngineError;

/// Most descriptors answered in one call.
pub const DESCRIPTORS_MAX: usize = 64;

/// Which descriptor entry keys carry what.
#[derive(Clone, Debug)]
pub struct DescriptorKeys {
    pub account: String,
    pub feature: String,
    pub request_id: String,
}

impl Default for DescriptorKeys {
    fn default() -> Self {
        DescriptorKeys {
            account: "account".into(),
            feature: "feature".into(),
            request_id: "request_id".into(),
        }
    }
}

pub struct EnvoyRateLimit<S: RegionStore> {
    engine: Arc<Engine<S>>,
    keys: DescriptorKeys,
    /// Numbers requests that carry no request id, so each gets its own key.
    sequence: AtomicU64,
    node: String,
}

impl<S: RegionStore> EnvoyRateLimit<S> {
    pub fn new(engine: Arc<Engine<S>>, keys: DescriptorKeys) -> Self {
        let node = engine.leases().lease_id().to_string();
        EnvoyRateLimit {
            engine,
            keys,
            sequence: AtomicU64::new(0),
            node,
        }
    }

    fn entry<'d>(descriptor: &'d RateLimitDescriptor, key: &str) -> Option<&'d str> {
        descriptor
            .entries
            .iter()
            .find(|entry| entry.key == key)
            .map(|entry| entry.value.as_str())
    }

    async fn decide(
        &self,
        request: &RateLimitRequest,
        index: usize,
        descriptor: &RateLimitDescriptor,
    ) -> Result<(DescriptorStatus, Option<String>), Status> {
        let ok = DescriptorStatus {
            code: Code::Ok as i32,
            ..DescriptorStatus::default()
        };
        let (Some(account), Some(feature)) = (
            Self::entry(descriptor, &self.keys.account),
            Self::entry(descriptor, &self.keys.feature),
        ) else {
            return Ok((ok, None));
        };
        let invalid = |field: &str, error: &dyn std::fmt::Display| {
            Status::invalid_argument(format!("descriptors[{index}].{field}: {error}"))
        };
        let account = AccountId::new(account).map_err(|e| invalid(&self.keys.account, &e))?;
        let feature = FeatureKey::new(feature).map_err(|e| invalid(&self.keys.feature, &e))?;
        let hits = match (&descriptor.hits_addend, request.hits_addend) {
            (Some(own), _) => own.value,
            (None, 0) => 1,
            (None, shared) => u64::from(shared),
        };
        let quantity = Quantity::from_units(hits).map_err(|e| invalid("hits_addend", &e))?;
        let key = match Self::entry(descriptor, &self.keys.request_id) {
            Some(id) => format!("envoy.{id}.{index}"),
            None => format!(
                "envoy.{}.{}",
                self.node,
                self.sequence.fetch_add(1, Ordering::Relaxed)
            ),
        };
        let key = IdempotencyKey::new(key).map_err(|e| invalid(&self.keys.request_id, &e))?;
        let debit = DebitRequest {
            account,
            key,
            feature,
            spend: Spend::Quantity(quantity),
            actor: None,
            mode: None,
            event_time: None,
        };
        match self.engine.debit(debit).await {
            Ok(Decision::Done(done)) => Ok((ok, Some(format!("balance={}", done.balance_after)))),
            Ok(Decision::Refused(refused)) => Ok(over_limit(&refused)),
            Err(EngineError::InvalidArgument { field, message }) => Err(Status::invalid_argument(
                format!("descriptors[{index}].{field}: {message}"),
            )),
            Err(EngineError::Conflict) => Err(Status::already_exists(
                "request id was used for a different request",
            )),
            Err(EngineError::Unavailable(message)) => Err(Status::unavailable(message)),
            Err(other) => Err(Status::internal(other.to_string())),
        }
    }
}

fn over_limit(refused: &Refused) -> (DescriptorStatus, Option<String>) {
    let mut status = DescriptorStatus {
        code: Code::OverLimit as i32,
        ..DescriptorStatus::default()
    };
    let reason = match refused {
        Refused::Insufficient { shortfall, .. } => {
            format!("insufficient_credits; shortfall={shortfall}")
        }
        Refused::RateLimited {
            feature,
            retry_after_ms,
        } => {
            if let Some(ms) = retry_after_ms {
                status.duration_until_reset = Some(envoy_types::pb::google::protobuf::Duration {
                    seconds: (*ms / 1_000) as i64,
                    nanos: ((*ms % 1_000) * 1_000_000) as i32,
                });
            }
            format!("rate_limited; feature={feature}")
        }
        Refused::AuthorityUnreachable { cost, balance, .. } => {
            format!("authority_unreachable; cost={cost}; balance={balance}")
        }
        Refused::UnknownFeature(feature) => format!("unknown_feature; feature={feature}"),
        Refused::UnknownAccount(account) => format!("unknown_account; account={account}"),
        Refused::Hold(_) | Refused::Reverse(_) => "refused".to_string(),
    };
    (status, Some(reason))
}

#[tonic::async_trait]
impl<S: RegionStore> RateLimitService for EnvoyRateLimit<S> {
    async fn should_rate_limit(
        &self,
        request: Request<RateLimitRequest>,
    ) -> Result<Response<RateLimitResponse>, Status> {
        let request = request.into_inner();
        if request.descriptors.len() > DESCRIPTORS_MAX {
            return Err(Status::invalid_argument(format!(
                "descriptors: {} given, at most {DESCRIPTORS_MAX}",
                request.descriptors.len()
            )));
        }
        let mut response = RateLimitResponse {
            overall_code: Code::Ok as i32,
            ..RateLimitResponse::default()
        };
        for (index, descriptor) in request.descriptors.iter().enumerate() {
            let (status, note) = self.decide(&request, index, descriptor).await?;
            if status.code == Code::OverLimit as i32 {
                response.overall_code = Code::OverLimit as i32;
            }
            if let Some(note) = note {
                let header = if status.code == Code::OverLimit as i32 {
                    "x-tollgate-refusal"
                } else {
                    "x-tollgate"
                };
                response.response_headers_to_add.push(HeaderValue {
                    key: header.into(),
                    value: note,
                    ..HeaderValue::default()
                });
            }
            response.statuses.push(status);
        }
        Ok(Response::new(response))
    }
}
