//! The Admin calls the console makes, through the same [`AdminService`] the gRPC listener
//! serves (decoding, validation and rules included), with the paging done here.

use tollgate_proto::pb;
use tollgate_proto::pb::admin_server::Admin as _;
use tonic::{Request, Status};

use crate::admin::AdminService;

/// Pages read at most by one list, so one page view stays bounded.
pub const PAGES_MAX: usize = 10;
/// Items per page asked for.
pub const PAGE_SIZE: u32 = 1_000;

#[tonic::async_trait]
pub trait AdminCalls {
    async fn call_account(&self, account: &str) -> Result<pb::Account, Status>;
    async fn call_grants(&self, account: &str, open_only: bool) -> Result<Vec<pb::Grant>, Status>;
    /// Entries matching `request`; `truncated` when more than [`PAGES_MAX`] pages matched.
    async fn call_entries(
        &self,
        request: pb::ListEntriesRequest,
    ) -> Result<(Vec<pb::Entry>, bool), Status>;
    async fn call_usage(
        &self,
        request: pb::GetUsageBreakdownRequest,
    ) -> Result<pb::GetUsageBreakdownReply, Status>;
    async fn call_price_versions(&self) -> Result<Vec<pb::PriceBookVersion>, Status>;
    async fn call_features(&self) -> Result<Vec<pb::Feature>, Status>;
    async fn call_plans(&self) -> Result<Vec<pb::Plan>, Status>;
}

#[tonic::async_trait]
impl AdminCalls for AdminService {
    async fn call_account(&self, account: &str) -> Result<pb::Account, Status> {
        let reply = self
            .get_account(Request::new(pb::GetAccountRequest {
                account_id: account.to_owned(),
            }))
            .await?
            .into_inner();
        reply
            .account
            .ok_or_else(|| Status::internal("get account: reply without an account"))
    }

    async fn call_grants(&self, account: &str, open_only: bool) -> Result<Vec<pb::Grant>, Status> {
        let mut grants = Vec::new();
        let mut token = String::new();
        for _ in 0..PAGES_MAX {
            let reply = self
                .list_grants(Request::new(pb::ListGrantsRequest {
                    account_id: account.to_owned(),
                    open_only,
                    page_size: PAGE_SIZE,
                    page_token: token,
                }))
                .await?
                .into_inner();
            grants.extend(reply.grants);
            if reply.next_page_token.is_empty() {
                break;
            }
            token = reply.next_page_token;
        }
        Ok(grants)
    }

    async fn call_entries(
        &self,
        mut request: pb::ListEntriesRequest,
    ) -> Result<(Vec<pb::Entry>, bool), Status> {
        let mut entries = Vec::new();
        request.page_size = PAGE_SIZE;
        for _ in 0..PAGES_MAX {
            let reply = self
                .list_entries(Request::new(request.clone()))
                .await?
                .into_inner();
            entries.extend(reply.entries);
            if reply.next_page_token.is_empty() {
                return Ok((entries, false));
            }
            request.page_token = reply.next_page_token;
        }
        Ok((entries, true))
    }

    async fn call_usage(
        &self,
        request: pb::GetUsageBreakdownRequest,
    ) -> Result<pb::GetUsageBreakdownReply, Status> {
        Ok(self
            .get_usage_breakdown(Request::new(request))
            .await?
            .into_inner())
    }

    async fn call_price_versions(&self) -> Result<Vec<pb::PriceBookVersion>, Status> {
        let mut versions = Vec::new();
        let mut token = String::new();
        for _ in 0..PAGES_MAX {
            let reply = self
                .list_price_book_versions(Request::new(pb::ListPriceBookVersionsRequest {
                    page_size: PAGE_SIZE,
                    page_token: token,
                }))
                .await?
                .into_inner();
            versions.extend(reply.versions);
            if reply.next_page_token.is_empty() {
                break;
            }
            token = reply.next_page_token;
        }
        Ok(versions)
    }

    async fn call_features(&self) -> Result<Vec<pb::Feature>, Status> {
        let mut features = Vec::new();
        let mut token = String::new();
        for _ in 0..PAGES_MAX {
            let reply = self
                .list_features(Request::new(pb::ListFeaturesRequest {
                    page_size: PAGE_SIZE,
                    page_token: token,
                }))
                .await?
                .into_inner();
            features.extend(reply.features);
            if reply.next_page_token.is_empty() {
                break;
            }
            token = reply.next_page_token;
        }
        Ok(features)
    }

    async fn call_plans(&self) -> Result<Vec<pb::Plan>, Status> {
        let mut plans = Vec::new();
        let mut token = String::new();
        for _ in 0..PAGES_MAX {
            let reply = self
                .list_plans(Request::new(pb::ListPlansRequest {
                    page_size: PAGE_SIZE,
                    page_token: token,
                }))
                .await?
                .into_inner();
            plans.extend(reply.plans);
            if reply.next_page_token.is_empty() {
                break;
            }
            token = reply.next_page_token;
        }
        Ok(plans)
    }
}
