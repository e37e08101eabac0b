//! The Admin gRPC service: each handler decodes (validating once), calls the ledger, encodes.

use std::sync::Arc;

use tollgate_core::command::{
    Adjust, CloseGrant, CreateAccount, IssueGrant, Refund, UpdateAccount,
};
use tollgate_core::AccountId;
use tollgate_ledger::{EntryFilter, LedgerStore, PageRequest};
use tollgate_proto::decode::{self, EntryQuery, GrantQuery};
use tollgate_proto::{pb, ErrorCode, ServiceError};
use tonic::{Request, Response, Status};

use crate::balance;
use crate::coordination::authority_error;
use crate::encode;
use crate::lifecycle;

/// Where "now" comes from; tests may pass their own.
pub use tollgate_authority::{Clock, SystemClock};

/// Accounts whose ledger an admin call changed, bounded: a full channel drops the notice and
/// the authority's next full notifier scan catches up.
pub const CHANGES_CHANNEL_CAPACITY: usize = 4_096;

/// What `GetBalance` names in `holds_unread` when this authority serves the ledger alone and
/// reaches no region's holds.
const REGIONS_NOT_REACHED: &str =
    "every region: this authority serves the ledger only and reads no region's holds";

pub struct AdminService {
    store: Arc<dyn LedgerStore>,
    clock: Arc<dyn Clock>,
    changes: Option<tokio::sync::mpsc::Sender<AccountId>>,
    lifecycle: Option<Arc<dyn crate::lifecycle::Lifecycle>>,
    audit: Option<tollgate_authority::StateStore>,
}

impl AdminService {
    pub fn new(store: Arc<dyn LedgerStore>, clock: Arc<dyn Clock>) -> Self {
        AdminService {
            store,
            clock,
            changes: None,
            lifecycle: None,
            audit: None,
        }
    }

    /// Serves `ListAuditRecords` from the authority's audit table (which the audit layer in
    /// front of this service writes); without it the call answers UNIMPLEMENTED.
    pub fn with_audit(mut self, state: tollgate_authority::StateStore) -> Self {
        self.audit = Some(state);
        self
    }

    /// Tells the authority which accounts admin calls changed (to notify and reallocate).
    pub fn with_changes(mut self, changes: tokio::sync::mpsc::Sender<AccountId>) -> Self {
        self.changes = Some(changes);
        self
    }

    /// Serves the calls the authority's lifecycle owns (features, prices, schedules, reports,
    /// events); without it they answer UNIMPLEMENTED.
    pub fn with_lifecycle(mut self, lifecycle: Arc<dyn crate::lifecycle::Lifecycle>) -> Self {
        self.lifecycle = Some(lifecycle);
        self
    }

    fn lifecycle(
        &self,
        call: &str,
        part: &str,
    ) -> Result<&Arc<dyn crate::lifecycle::Lifecycle>, Status> {
        self.lifecycle
            .as_ref()
            .ok_or_else(|| not_served_yet(call, part))
    }

    /// The account as replies carry it, with the authority's settings when it serves them.
    async fn account_reply(
        &self,
        snapshot: &tollgate_ledger::AccountSnapshot,
    ) -> Result<pb::Account, Status> {
        let mut account = encode::account(snapshot);
        if let Some(lifecycle) = &self.lifecycle {
            let settings = lifecycle
                .account_settings(snapshot.account.clone())
                .await
                .map_err(authority_error)?;
            account.settings = Some(lifecycle::settings_to_pb(&settings));
        }
        Ok(account)
    }

    /// Whether a contract in force for the account says its grants never expire. An account
    /// id that does not decode answers false: the request's own decoding names the field.
    async fn no_expiry_clause(&self, account: &str) -> Result<bool, Status> {
        let (Some(lifecycle), Ok(account)) = (&self.lifecycle, AccountId::new(account)) else {
            return Ok(false);
        };
        let now = self.clock.now();
        let contracts = lifecycle
            .contracts(account)
            .await
            .map_err(authority_error)?;
        Ok(contracts.iter().any(|c| c.no_expiry && c.is_active_at(now)))
    }

    /// What closes a grant early or takes credits away: the authority, which takes them back
    /// from the regions first; without one (a ledger on its own) the ledger directly.
    fn closer<'a>(
        &'a self,
        ledger_only: &'a tollgate_authority::LedgerCloser<'a>,
    ) -> &'a dyn tollgate_authority::GrantCloser {
        match &self.lifecycle {
            Some(lifecycle) => lifecycle.closer(),
            None => ledger_only,
        }
    }

    fn changed(&self, account: &AccountId) {
        if let Some(changes) = &self.changes {
            let _ = changes.try_send(account.clone());
        }
    }
}

type Reply<T> = Result<Response<T>, Status>;

/// Calls of the contract that arrive with later issues (features, prices, schedules, reports,
/// events): a clear UNIMPLEMENTED, never a silent success.
fn not_served_yet(call: &str, part: &str) -> Status {
    ServiceError::new(
        ErrorCode::Unimplemented,
        format!("{call}: {part} are not served by this authority yet"),
    )
    .into()
}

fn account_id(text: &str) -> Result<AccountId, Status> {
    Ok(decode::id("account_id", text)?)
}

#[tonic::async_trait]
impl pb::admin_server::Admin for AdminService {
    async fn create_account(
        &self,
        request: Request<pb::CreateAccountRequest>,
    ) -> Reply<pb::CreateAccountReply> {
        let command = CreateAccount::try_from(request.into_inner())?;
        let snapshot = self
            .store
            .create_account(command, self.clock.now())
            .await
            .map_err(encode::ledger_error)?;
        self.changed(&snapshot.account);
        Ok(Response::new(pb::CreateAccountReply {
            account: Some(self.account_reply(&snapshot).await?),
        }))
    }

    async fn get_account(
        &self,
        request: Request<pb::GetAccountRequest>,
    ) -> Reply<pb::GetAccountReply> {
        let account = account_id(&request.into_inner().account_id)?;
        let snapshot = self
            .store
            .account(&account)
            .await
            .map_err(encode::ledger_error)?;
        Ok(Response::new(pb::GetAccountReply {
            account: Some(self.account_reply(&snapshot).await?),
        }))
    }

    async fn list_accounts(
        &self,
        request: Request<pb::ListAccountsRequest>,
    ) -> Reply<pb::ListAccountsReply> {
        let request = request.into_inner();
        let page = PageRequest {
            size: request.page_size,
            token: decode::page_token("page_token", &request.page_token)?,
        };
        let page = self
            .store
            .list_accounts(page)
            .await
            .map_err(encode::ledger_error)?;
        let mut accounts = Vec::with_capacity(page.items.len());
        for snapshot in &page.items {
            accounts.push(self.account_reply(snapshot).await?);
        }
        Ok(Response::new(pb::ListAccountsReply {
            accounts,
            next_page_token: page.next_token.unwrap_or_default(),
        }))
    }

    async fn update_account(
        &self,
        request: Request<pb::UpdateAccountRequest>,
    ) -> Reply<pb::UpdateAccountReply> {
        let request = request.into_inner();
        // Everything is validated before anything is written: bad input changes nothing.
        let terms = UpdateAccount::try_from(&request)?;
        let change = lifecycle::settings_change_from_pb(&request)?;
        let account = terms.account.clone();
        let lifecycle = if change.is_empty() {
            None
        } else {
            let lifecycle = self.lifecycle("UpdateAccount", "account settings")?;
            let current = lifecycle
                .account_settings(account.clone())
                .await
                .map_err(authority_error)?;
            change.apply(&current).map_err(authority_error)?;
            Some(lifecycle)
        };
        let snapshot = if decode::changes_ledger_terms(&request) {
            self.store
                .update_account(terms, self.clock.now())
                .await
                .map_err(encode::ledger_error)?
        } else {
            self.store
                .account(&account)
                .await
                .map_err(encode::ledger_error)?
        };
        if let Some(lifecycle) = lifecycle {
            lifecycle
                .update_settings(account.clone(), change)
                .await
                .map_err(authority_error)?;
        }
        // A new limit or plan reaches the regions through the authority's reallocation.
        self.changed(&account);
        Ok(Response::new(pb::UpdateAccountReply {
            account: Some(self.account_reply(&snapshot).await?),
        }))
    }

    async fn define_feature(
        &self,
        request: Request<pb::DefineFeatureRequest>,
    ) -> Reply<pb::DefineFeatureReply> {
        let lifecycle = self.lifecycle("DefineFeature", "features")?;
        let request = request.into_inner();
        decode::idempotency_key(&request.idempotency_key)?;
        let feature = lifecycle::feature_from_pb(request.feature)?;
        lifecycle
            .define_feature(feature.clone())
            .await
            .map_err(authority_error)?;
        Ok(Response::new(pb::DefineFeatureReply {
            feature: Some(lifecycle::feature_to_pb(&feature)),
        }))
    }

    async fn list_features(
        &self,
        request: Request<pb::ListFeaturesRequest>,
    ) -> Reply<pb::ListFeaturesReply> {
        let lifecycle = self.lifecycle("ListFeatures", "features")?;
        Ok(Response::new(
            lifecycle::list_features(lifecycle.as_ref(), request.into_inner()).await?,
        ))
    }

    async fn publish_price_book_version(
        &self,
        request: Request<pb::PublishPriceBookVersionRequest>,
    ) -> Reply<pb::PublishPriceBookVersionReply> {
        let lifecycle = self.lifecycle("PublishPriceBookVersion", "price book versions")?;
        let request = request.into_inner();
        decode::idempotency_key(&request.idempotency_key)?;
        // Every problem is named at once: bad rates and keys, then unknown features and plans.
        let (version, mut problems) = lifecycle::price_version_parts(request.version);
        if let Some(version) = &version {
            problems.extend(
                lifecycle
                    .price_version_problems(version.clone())
                    .await
                    .map_err(authority_error)?,
            );
        }
        lifecycle::refuse_all(problems)?;
        let Some(version) = version else {
            return Err(ServiceError::invalid("version", "must be set").into());
        };
        lifecycle
            .publish_price_version(version.clone())
            .await
            .map_err(authority_error)?;
        Ok(Response::new(pb::PublishPriceBookVersionReply {
            version: Some(lifecycle::price_version_to_pb(&version)),
        }))
    }

    async fn list_price_book_versions(
        &self,
        _: Request<pb::ListPriceBookVersionsRequest>,
    ) -> Reply<pb::ListPriceBookVersionsReply> {
        let lifecycle = self.lifecycle("ListPriceBookVersions", "price book versions")?;
        let versions = lifecycle.price_versions().await.map_err(authority_error)?;
        Ok(Response::new(pb::ListPriceBookVersionsReply {
            versions: versions
                .iter()
                .map(lifecycle::price_version_to_pb)
                .collect(),
            next_page_token: String::new(),
        }))
    }

    async fn issue_grant(
        &self,
        request: Request<pb::IssueGrantRequest>,
    ) -> Reply<pb::MutationReply> {
        let mut command = IssueGrant::try_from(request.into_inner())?;
        let account = command.account.clone();
        if self.no_expiry_clause(account.as_str()).await? {
            command.terms.expires_at = None;
        }
        let outcome = self.store.issue_grant(command, self.clock.now()).await;
        let reply = encode::mutation(outcome.map_err(encode::ledger_error)?);
        self.changed(&account);
        Ok(Response::new(reply))
    }

    async fn void_grant(&self, request: Request<pb::VoidGrantRequest>) -> Reply<pb::MutationReply> {
        let command = CloseGrant::try_from(request.into_inner())?;
        let account = command.account.clone();
        let ledger_only = tollgate_authority::LedgerCloser(self.store.as_ref());
        let outcome = self
            .closer(&ledger_only)
            .close_grant(command, self.clock.now())
            .await;
        let reply = encode::mutation(outcome.map_err(crate::coordination::authority_error)?);
        self.changed(&account);
        Ok(Response::new(reply))
    }

    async fn expire_grant(
        &self,
        request: Request<pb::ExpireGrantRequest>,
    ) -> Reply<pb::MutationReply> {
        let command = CloseGrant::try_from(request.into_inner())?;
        let account = command.account.clone();
        let outcome = self.store.close_grant(command, self.clock.now()).await;
        let reply = encode::mutation(outcome.map_err(encode::ledger_error)?);
        self.changed(&account);
        Ok(Response::new(reply))
    }

    async fn list_grants(
        &self,
        request: Request<pb::ListGrantsRequest>,
    ) -> Reply<pb::ListGrantsReply> {
        let query = GrantQuery::try_from(request.into_inner())?;
        let page = PageRequest {
            size: query.page_size,
            token: query.page_token,
        };
        let page = self
            .store
            .grants(&query.account, query.open_only, page)
            .await
            .map_err(encode::ledger_error)?;
        Ok(Response::new(pb::ListGrantsReply {
            grants: page.items.iter().map(encode::grant).collect(),
            next_page_token: page.next_token.unwrap_or_default(),
        }))
    }

    async fn create_schedule(
        &self,
        request: Request<pb::CreateScheduleRequest>,
    ) -> Reply<pb::CreateScheduleReply> {
        let lifecycle = self.lifecycle("CreateSchedule", "recurring schedules")?;
        let request = request.into_inner();
        decode::idempotency_key(&request.idempotency_key)?;
        let (account, schedule, ends_at) = lifecycle::schedule_from_pb(request.schedule)?;
        let record = lifecycle
            .create_schedule(account, schedule, ends_at)
            .await
            .map_err(authority_error)?;
        Ok(Response::new(pb::CreateScheduleReply {
            schedule: Some(lifecycle::schedule_to_pb(&record)),
        }))
    }

    async fn cancel_schedule(
        &self,
        request: Request<pb::CancelScheduleRequest>,
    ) -> Reply<pb::CancelScheduleReply> {
        let lifecycle = self.lifecycle("CancelSchedule", "recurring schedules")?;
        let request = request.into_inner();
        decode::idempotency_key(&request.idempotency_key)?;
        let account = account_id(&request.account_id)?;
        let record = lifecycle
            .cancel_schedule(account, request.schedule_id)
            .await
            .map_err(authority_error)?;
        Ok(Response::new(pb::CancelScheduleReply {
            schedule: Some(lifecycle::schedule_to_pb(&record)),
        }))
    }

    async fn list_schedules(
        &self,
        request: Request<pb::ListSchedulesRequest>,
    ) -> Reply<pb::ListSchedulesReply> {
        let lifecycle = self.lifecycle("ListSchedules", "recurring schedules")?;
        let request = request.into_inner();
        let account = account_id(&request.account_id)?;
        let size = if request.page_size == 0 {
            lifecycle::LIST_SIZE_DEFAULT
        } else {
            request.page_size.min(lifecycle::LIST_SIZE_MAX)
        };
        let after = decode::page_token("page_token", &request.page_token)?.unwrap_or_default();
        let records = lifecycle
            .schedules(account, after, size)
            .await
            .map_err(authority_error)?;
        let next_page_token = if records.len() == size as usize {
            records
                .last()
                .map(|r| r.schedule.id.clone())
                .unwrap_or_default()
        } else {
            String::new()
        };
        Ok(Response::new(pb::ListSchedulesReply {
            schedules: records.iter().map(lifecycle::schedule_to_pb).collect(),
            next_page_token,
        }))
    }

    async fn refund(&self, request: Request<pb::RefundRequest>) -> Reply<pb::MutationReply> {
        let command = Refund::try_from(request.into_inner())?;
        let account = command.account.clone();
        let outcome = self.store.refund(command, self.clock.now()).await;
        let reply = encode::mutation(outcome.map_err(encode::ledger_error)?);
        self.changed(&account);
        Ok(Response::new(reply))
    }

    async fn adjust(&self, request: Request<pb::AdjustRequest>) -> Reply<pb::MutationReply> {
        let command = Adjust::try_from(request.into_inner())?;
        let account = command.account.clone();
        let ledger_only = tollgate_authority::LedgerCloser(self.store.as_ref());
        let outcome = self
            .closer(&ledger_only)
            .adjust(command, self.clock.now())
            .await;
        let reply = encode::mutation(outcome.map_err(crate::coordination::authority_error)?);
        self.changed(&account);
        Ok(Response::new(reply))
    }

    async fn list_entries(
        &self,
        request: Request<pb::ListEntriesRequest>,
    ) -> Reply<pb::ListEntriesReply> {
        let query = EntryQuery::try_from(request.into_inner())?;
        let filter = EntryFilter {
            account: query.account,
            kinds: query.kinds,
            grant: query.grant,
            debit: query.debit,
            from: query.from,
            until: query.until,
        };
        let page = PageRequest {
            size: query.page_size,
            token: query.page_token,
        };
        let page = self
            .store
            .entries(&filter, page)
            .await
            .map_err(encode::ledger_error)?;
        Ok(Response::new(pb::ListEntriesReply {
            entries: page.items.iter().map(encode::entry).collect(),
            next_page_token: page.next_token.unwrap_or_default(),
        }))
    }

    async fn get_balance(
        &self,
        request: Request<pb::AdminGetBalanceRequest>,
    ) -> Reply<pb::AdminGetBalanceReply> {
        let account = account_id(&request.into_inner().account_id)?;
        let regions = self.lifecycle.as_deref();
        let (snapshot, mut told) =
            balance::read(self.store.as_ref(), regions, &account, self.clock.now())
                .await
                .map_err(encode::ledger_error)?;
        if regions.is_none() {
            // A ledger-only authority reaches no region: say so rather than count no holds.
            told.holds_unread.push(REGIONS_NOT_REACHED.to_owned());
        }
        Ok(Response::new(encode::balance_reply(&snapshot, &told)))
    }

    async fn verify(&self, request: Request<pb::VerifyRequest>) -> Reply<pb::VerifyReply> {
        let account =
            decode::optional_id::<AccountId>("account_id", &request.into_inner().account_id)?;
        let report = self
            .store
            .verify(account.as_ref())
            .await
            .map_err(encode::ledger_error)?;
        Ok(Response::new(encode::verify(&report)))
    }

    async fn get_usage_breakdown(
        &self,
        request: Request<pb::GetUsageBreakdownRequest>,
    ) -> Reply<pb::GetUsageBreakdownReply> {
        let lifecycle = self.lifecycle("GetUsageBreakdown", "usage reports")?;
        Ok(Response::new(
            lifecycle::usage_breakdown(lifecycle.as_ref(), request.into_inner()).await?,
        ))
    }

    async fn get_revenue_report(
        &self,
        request: Request<pb::GetRevenueReportRequest>,
    ) -> Reply<pb::GetRevenueReportReply> {
        let lifecycle = self.lifecycle("GetRevenueReport", "revenue reports")?;
        Ok(Response::new(
            lifecycle::revenue_report(lifecycle.as_ref(), request.into_inner()).await?,
        ))
    }

    async fn define_plan(
        &self,
        request: Request<pb::DefinePlanRequest>,
    ) -> Reply<pb::DefinePlanReply> {
        let lifecycle = self.lifecycle("DefinePlan", "plans")?;
        let request = request.into_inner();
        decode::idempotency_key(&request.idempotency_key)?;
        let plan = crate::plans::plan_from_pb(request.plan)?;
        lifecycle
            .define_plan(plan.clone())
            .await
            .map_err(authority_error)?;
        Ok(Response::new(pb::DefinePlanReply {
            plan: Some(crate::plans::plan_to_pb(&plan)),
        }))
    }

    async fn list_plans(
        &self,
        request: Request<pb::ListPlansRequest>,
    ) -> Reply<pb::ListPlansReply> {
        let lifecycle = self.lifecycle("ListPlans", "plans")?;
        let request = request.into_inner();
        let size = lifecycle::list_size(request.page_size)?;
        let after = decode::page_token("page_token", &request.page_token)?.unwrap_or_default();
        let plans = lifecycle
            .plans(after, size)
            .await
            .map_err(authority_error)?;
        let next_page_token = match plans.last() {
            Some(last) if plans.len() == size as usize => last.id.to_string(),
            _ => String::new(),
        };
        Ok(Response::new(pb::ListPlansReply {
            plans: plans.iter().map(crate::plans::plan_to_pb).collect(),
            next_page_token,
        }))
    }

    async fn change_plan(
        &self,
        request: Request<pb::ChangePlanRequest>,
    ) -> Reply<pb::ChangePlanReply> {
        let lifecycle = self.lifecycle("ChangePlan", "plans")?;
        let (account, change) = crate::plans::plan_change_from_pb(&request.into_inner())?;
        let report = lifecycle
            .change_plan(account.clone(), change)
            .await
            .map_err(authority_error)?;
        self.changed(&account);
        Ok(Response::new(crate::plans::plan_change_to_pb(&report)))
    }

    async fn set_contracts(
        &self,
        request: Request<pb::SetContractsRequest>,
    ) -> Reply<pb::SetContractsReply> {
        let lifecycle = self.lifecycle("SetContracts", "contracts")?;
        let request = request.into_inner();
        decode::idempotency_key(&request.idempotency_key)?;
        let account = account_id(&request.account_id)?;
        let contracts = crate::plans::contracts_from_pb(&account, &request.contracts)?;
        lifecycle
            .set_contracts(account.clone(), contracts.clone())
            .await
            .map_err(authority_error)?;
        Ok(Response::new(pb::SetContractsReply {
            contracts: contracts.iter().map(crate::plans::contract_to_pb).collect(),
        }))
    }

    async fn get_contracts(
        &self,
        request: Request<pb::GetContractsRequest>,
    ) -> Reply<pb::GetContractsReply> {
        let lifecycle = self.lifecycle("GetContracts", "contracts")?;
        let account = account_id(&request.into_inner().account_id)?;
        let contracts = lifecycle
            .contracts(account)
            .await
            .map_err(authority_error)?;
        Ok(Response::new(pb::GetContractsReply {
            contracts: contracts.iter().map(crate::plans::contract_to_pb).collect(),
        }))
    }

    async fn rank_accounts(
        &self,
        request: Request<pb::RankAccountsRequest>,
    ) -> Reply<pb::RankAccountsReply> {
        let lifecycle = self.lifecycle("RankAccounts", "burn rankings")?;
        Ok(Response::new(
            lifecycle::rank_accounts(lifecycle.as_ref(), request.into_inner(), self.clock.now())
                .await?,
        ))
    }

    type WatchEventsStream = lifecycle::EventStream;

    async fn watch_events(
        &self,
        request: Request<pb::WatchEventsRequest>,
    ) -> Reply<Self::WatchEventsStream> {
        let lifecycle = self.lifecycle("WatchEvents", "events")?;
        Ok(Response::new(
            lifecycle::watch(Arc::clone(lifecycle), request.into_inner()).await?,
        ))
    }

    async fn purchase(&self, request: Request<pb::PurchaseRequest>) -> Reply<pb::PurchaseReply> {
        let request = request.into_inner();
        let no_expiry = self.no_expiry_clause(&request.account_id).await?;
        let (reply, account) =
            crate::purchases::purchase(self.store.as_ref(), self.clock.now(), request, no_expiry)
                .await?;
        self.changed(&account);
        Ok(Response::new(reply))
    }

    async fn refund_purchase(
        &self,
        request: Request<pb::RefundPurchaseRequest>,
    ) -> Reply<pb::RefundPurchaseReply> {
        let ledger_only = tollgate_authority::LedgerCloser(self.store.as_ref());
        let (reply, account) = crate::purchases::refund_purchase(
            self.store.as_ref(),
            self.closer(&ledger_only),
            self.clock.now(),
            request.into_inner(),
        )
        .await?;
        self.changed(&account);
        Ok(Response::new(reply))
    }

    async fn list_audit_records(
        &self,
        request: Request<pb::ListAuditRecordsRequest>,
    ) -> Reply<pb::ListAuditRecordsReply> {
        let state = self
            .audit
            .as_ref()
            .ok_or_else(|| not_served_yet("ListAuditRecords", "audit records"))?;
        Ok(Response::new(
            crate::audit::list(state, request.into_inner()).await?,
        ))
    }

    async fn list_parked_usage(
        &self,
        request: Request<pb::ListParkedUsageRequest>,
    ) -> Reply<pb::ListParkedUsageReply> {
        // Parked usage lives in the authority's state store, which `with_audit` hands over.
        let state = self
            .audit
            .as_ref()
            .ok_or_else(|| not_served_yet("ListParkedUsage", "parked usage records"))?;
        Ok(Response::new(
            crate::parked::list(state, request.into_inner()).await?,
        ))
    }

    async fn resolve_parked_usage(
        &self,
        request: Request<pb::ResolveParkedUsageRequest>,
    ) -> Reply<pb::ResolveParkedUsageReply> {
        let state = self
            .audit
            .as_ref()
            .ok_or_else(|| not_served_yet("ResolveParkedUsage", "parked usage records"))?;
        // The auth layer names the caller's key; without one (a service built bare, in
        // tests) the resolution says so.
        let by = request
            .extensions()
            .get::<tollgate_serve::auth::Caller>()
            .map_or_else(|| "unknown".to_owned(), |caller| caller.key_name.clone());
        let command = crate::parked::decode_resolve(request.into_inner(), by)?;
        let (reply, account) =
            crate::parked::resolve(self.store.as_ref(), state, &command, self.clock.now()).await?;
        if !reply.replayed {
            self.changed(&account);
        }
        Ok(Response::new(reply))
    }
}
