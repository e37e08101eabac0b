//! The `Coordination` service edges call on the cold path, and the same answer in process for
//! the embedded node's edge.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use tollgate_authority::allocator::{Allocation, AllocationOutcome};
use tollgate_authority::{Authority, AuthorityError};
use tollgate_core::{AccountId, Credits, FeatureKey, RegionId, Scope};
use tollgate_edge::{AllocationAnswer, AllocationRequester, EngineError};
use tollgate_ledger::LedgerStore;
use tollgate_proto::{decode, pb, ErrorCode, ServiceError};
use tollgate_region::{EnforcementMode, RegionStore};
use tonic::{Request, Response, Status};

/// How often edges report in.
pub const HEARTBEAT_INTERVAL_MS: u32 = 10_000;

type Node<R> = Authority<dyn LedgerStore, R>;

pub struct CoordinationService<R: RegionStore> {
    authority: Arc<Node<R>>,
}

impl<R: RegionStore> CoordinationService<R> {
    pub fn new(authority: Arc<Node<R>>) -> Self {
        CoordinationService { authority }
    }
}

pub fn authority_error(error: AuthorityError) -> Status {
    let code = match &error {
        AuthorityError::Ledger(ledger) => return crate::encode::ledger_error_ref(ledger),
        AuthorityError::InvalidArgument { .. } => ErrorCode::InvalidArgument,
        AuthorityError::NotFound(_) => ErrorCode::NotFound,
        AuthorityError::Conflict(_) => ErrorCode::AlreadyExists,
        AuthorityError::Region { .. } | AuthorityError::State(_) => ErrorCode::Unavailable,
        AuthorityError::Corrupt(_) => ErrorCode::Internal,
        // Said as it is: what to wait for, or what to do, is in the message.
        AuthorityError::Busy(why) => {
            return ServiceError::new(ErrorCode::Unavailable, why.clone()).into()
        }
        AuthorityError::Precondition(why) => {
            return ServiceError::new(ErrorCode::FailedPrecondition, why.clone()).into()
        }
    };
    if matches!(code, ErrorCode::Internal | ErrorCode::Unavailable) {
        tracing::error!(%error, "authority call failed");
        return ServiceError::new(code, "authority unavailable, retry").into();
    }
    ServiceError::new(code, error.to_string()).into()
}

fn allocation_to_pb(allocation: &Allocation) -> pb::Allocation {
    let segments = allocation
        .segments
        .iter()
        .map(|s| pb::AllocationSegment {
            grant_id: s.grant_id.to_string(),
            amount: s.remaining.to_string(),
            priority: s.priority,
            effective_at: Some(decode::timestamp_to_pb(s.effective_at)),
            expires_at: s.expires_at.map(decode::timestamp_to_pb),
            scope: Some(pb::Scope {
                features: match &s.scope {
                    Scope::All => Vec::new(),
                    Scope::Features(f) => f.iter().map(ToString::to_string).collect(),
                },
            }),
        })
        .collect();
    let mode = match allocation.mode {
        EnforcementMode::Strict => pb::EnforcementModeHint::Strict,
        EnforcementMode::Cached => pb::EnforcementModeHint::Cached,
    };
    pb::Allocation {
        account_id: allocation.account.to_string(),
        region: allocation.region.to_string(),
        segments,
        overdraft_room: allocation.overdraft_room.to_string(),
        mode: mode.into(),
        generation: allocation.generation,
        unallocated: allocation.unallocated.to_string(),
    }
}

#[tonic::async_trait]
impl<R: RegionStore> pb::coordination_server::Coordination for CoordinationService<R> {
    async fn register_edge(
        &self,
        request: Request<pb::RegisterEdgeRequest>,
    ) -> Result<Response<pb::RegisterEdgeReply>, Status> {
        let request = request.into_inner();
        let region: RegionId = decode::id("region", &request.region)?;
        if !self.authority.regions().contains_key(&region) {
            return Err(ServiceError::new(
                ErrorCode::NotFound,
                format!("region {region} is not served by this authority"),
            )
            .into());
        }
        let versions = self
            .authority
            .state()
            .price_versions()
            .await
            .map_err(authority_error)?;
        Ok(Response::new(pb::RegisterEdgeReply {
            price_book_version: versions.last().map_or(0, |v| v.version),
            heartbeat_interval_ms: HEARTBEAT_INTERVAL_MS,
        }))
    }

    async fn request_allocation(
        &self,
        request: Request<pb::RequestAllocationRequest>,
    ) -> Result<Response<pb::RequestAllocationReply>, Status> {
        let request = request.into_inner();
        decode::idempotency_key(&request.idempotency_key)?;
        let region: RegionId = decode::id("region", &request.region)?;
        let account: AccountId = decode::id("account_id", &request.account_id)?;
        let feature: Option<FeatureKey> = decode::optional_id("feature", &request.feature)?;
        let needed = if request.needed.is_empty() {
            Credits::ZERO
        } else {
            decode::non_negative_credits("needed", &request.needed)?
        };
        let outcome = self
            .authority
            .request_allocation(&region, &account, feature.as_ref(), needed)
            .await
            .map_err(authority_error)?;
        let outcome = match outcome {
            AllocationOutcome::Allocated(allocation) => {
                pb::request_allocation_reply::Outcome::Allocation(allocation_to_pb(&allocation))
            }
            AllocationOutcome::UnknownAccount => {
                pb::request_allocation_reply::Outcome::Refused(pb::Refusal {
                    code: pb::RefusalCode::UnknownAccount.into(),
                    message: format!("account {account} does not exist"),
                    ..pb::Refusal::default()
                })
            }
        };
        Ok(Response::new(pb::RequestAllocationReply {
            outcome: Some(outcome),
        }))
    }
}

/// The embedded node's edge asks the authority in process.
pub struct LocalAllocator<R: RegionStore> {
    authority: Arc<Node<R>>,
    region: RegionId,
}

impl<R: RegionStore> LocalAllocator<R> {
    pub fn new(authority: Arc<Node<R>>, region: RegionId) -> Self {
        LocalAllocator { authority, region }
    }
}

impl<R: RegionStore> AllocationRequester for LocalAllocator<R> {
    fn request_allocation<'a>(
        &'a self,
        account: &'a AccountId,
        feature: Option<&'a FeatureKey>,
        needed: Credits,
    ) -> Pin<Box<dyn Future<Output = Result<AllocationAnswer, EngineError>> + Send + 'a>> {
        Box::pin(async move {
            match self
                .authority
                .request_allocation(&self.region, account, feature, needed)
                .await
            {
                Ok(AllocationOutcome::Allocated(allocation)) => Ok(AllocationAnswer {
                    exists: true,
                    unallocated: Some(allocation.unallocated),
                }),
                Ok(AllocationOutcome::UnknownAccount) => Ok(AllocationAnswer::UNKNOWN),
                Err(error) => Err(EngineError::Unavailable(error.to_string())),
            }
        })
    }
}
