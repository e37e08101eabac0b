//! The cold path over gRPC: asks the authority's `Coordination` service for an allocation.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tollgate_core::{AccountId, Credits, FeatureKey, RegionId};
use tollgate_proto::pb;
use tonic::metadata::MetadataValue;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};

use crate::engine::{AllocationAnswer, AllocationRequester};
use crate::error::EngineError;

/// How long the authority may take to answer the cold path.
pub const ALLOCATION_TIMEOUT_MS: u64 = 2_000;

pub struct AuthorityClient {
    channel: Channel,
    region: RegionId,
    authorization: Option<MetadataValue<tonic::metadata::Ascii>>,
    node: String,
    sequence: AtomicU64,
}

impl AuthorityClient {
    /// A lazy connection: the authority may start after the edge, and the edge keeps serving
    /// what its region holds while the authority is away.
    pub fn new(
        url: &str,
        region: RegionId,
        api_key: Option<&str>,
        node: String,
    ) -> Result<Self, EngineError> {
        Self::with_tls(url, None, region, api_key, node)
    }

    /// [`AuthorityClient::new`] over TLS (an `https://` URL): `tls` names the CA the
    /// authority's certificate is checked against, and the edge's own certificate when the
    /// authority requires one.
    pub fn with_tls(
        url: &str,
        tls: Option<ClientTlsConfig>,
        region: RegionId,
        api_key: Option<&str>,
        node: String,
    ) -> Result<Self, EngineError> {
        let mut endpoint = Endpoint::from_shared(url.to_string())
            .map_err(|e| EngineError::InvalidArgument {
                field: "authority_url",
                message: e.to_string(),
            })?
            .connect_timeout(Duration::from_millis(ALLOCATION_TIMEOUT_MS))
            .timeout(Duration::from_millis(ALLOCATION_TIMEOUT_MS));
        if let Some(tls) = tls {
            endpoint = endpoint
                .tls_config(tls)
                .map_err(|e| EngineError::InvalidArgument {
                    field: "authority_tls",
                    message: e.to_string(),
                })?;
        }
        let authorization = api_key
            .map(|key| format!("Bearer {key}").parse())
            .transpose()
            .map_err(|_| EngineError::InvalidArgument {
                field: "authority_api_key",
                message: "not valid in a header".into(),
            })?;
        Ok(AuthorityClient {
            channel: endpoint.connect_lazy(),
            region,
            authorization,
            node,
            sequence: AtomicU64::new(0),
        })
    }
}

impl AllocationRequester for AuthorityClient {
    fn request_allocation<'a>(
        &'a self,
        account: &'a AccountId,
        feature: Option<&'a FeatureKey>,
        needed: Credits,
    ) -> Pin<Box<dyn Future<Output = Result<AllocationAnswer, EngineError>> + Send + 'a>> {
        Box::pin(async move {
            let n = self.sequence.fetch_add(1, Ordering::Relaxed);
            let mut request = tonic::Request::new(pb::RequestAllocationRequest {
                idempotency_key: format!("{}.alloc.{n}", self.node),
                region: self.region.to_string(),
                account_id: account.to_string(),
                feature: feature.map(ToString::to_string).unwrap_or_default(),
                needed: if needed.is_positive() {
                    needed.to_string()
                } else {
                    String::new()
                },
            });
            if let Some(authorization) = &self.authorization {
                request
                    .metadata_mut()
                    .insert("authorization", authorization.clone());
            }
            let mut client = pb::coordination_client::CoordinationClient::new(self.channel.clone());
            let reply = client
                .request_allocation(request)
                .await
                .map_err(|status| {
                    EngineError::Unavailable(format!("authority: {}", status.message()))
                })?
                .into_inner();
            Ok(match reply.outcome {
                Some(pb::request_allocation_reply::Outcome::Allocation(allocation)) => {
                    AllocationAnswer {
                        exists: true,
                        // An authority that does not say is asked again next time.
                        unallocated: Credits::parse(&allocation.unallocated).ok(),
                    }
                }
                _ => AllocationAnswer::UNKNOWN,
            })
        })
    }
}
