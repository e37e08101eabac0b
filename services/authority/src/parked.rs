//! Parked usage over Admin (`ListParkedUsage`, `ResolveParkedUsage`) and on `/metrics`:
//! decode, call `tollgate_authority::parked` and the state store, encode.

use std::sync::Arc;

use tollgate_authority::state::{ParkedFilter, ParkedRow, ParkedState, PARKED_PAGE_MAX};
use tollgate_authority::{ParkedAction, ResolveParked, StateStore};
use tollgate_ledger::LedgerStore;
use tollgate_proto::decode::{self, price_rule_to_pb, timestamp_to_pb};
use tollgate_proto::{pb, ServiceError};
use tonic::Status;

use crate::coordination::authority_error;

/// Records per `ListParkedUsage` page when the request does not say.
pub const PARKED_PAGE_DEFAULT: u32 = 100;
/// Characters a write-off's reason may have.
pub const PARKED_REASON_CHARS_MAX: usize = 1_000;

pub async fn list(
    state: &StateStore,
    request: pb::ListParkedUsageRequest,
) -> Result<pb::ListParkedUsageReply, Status> {
    if !request.account_id.is_empty() {
        decode::id::<tollgate_core::AccountId>("account_id", &request.account_id)?;
    }
    let filter = match pb::ParkedState::try_from(request.state) {
        Ok(pb::ParkedState::Unspecified) => ParkedFilter::All,
        Ok(pb::ParkedState::Open) => ParkedFilter::Open,
        Ok(pb::ParkedState::Resolved) => ParkedFilter::Resolved,
        Err(_) => return Err(invalid("state", "not a parked state")),
    };
    if request.page_size > PARKED_PAGE_MAX {
        return Err(invalid("page_size", &format!("at most {PARKED_PAGE_MAX}")));
    }
    let size = match request.page_size {
        0 => PARKED_PAGE_DEFAULT,
        size => size,
    };
    let after = match request.page_token.as_str() {
        "" => 0,
        token => token
            .parse::<i64>()
            .ok()
            .filter(|after| *after >= 0)
            .ok_or_else(|| invalid("page_token", "not a token of this list"))?,
    };
    let rows = state
        .parked_after(after, &request.account_id, filter, size)
        .await
        .map_err(authority_error)?;
    let next_page_token = match rows.last() {
        Some(last) if rows.len() == size as usize => last.id.to_string(),
        _ => String::new(),
    };
    Ok(pb::ListParkedUsageReply {
        records: rows.iter().map(record_to_pb).collect(),
        next_page_token,
    })
}

/// Decodes a `ResolveParkedUsage`, naming the field at fault; `by` is the caller's key name.
pub fn decode_resolve(
    request: pb::ResolveParkedUsageRequest,
    by: String,
) -> Result<ResolveParked, Status> {
    let key = decode::idempotency_key(&request.idempotency_key)?;
    let id = request
        .id
        .parse::<i64>()
        .ok()
        .filter(|id| *id > 0)
        .ok_or_else(|| invalid("id", "not a parked usage id (a positive number)"))?;
    let action = match pb::ParkedAction::try_from(request.action) {
        Ok(pb::ParkedAction::Charge) => ParkedAction::Charge,
        Ok(pb::ParkedAction::WriteOff) => ParkedAction::WriteOff,
        _ => return Err(invalid("action", "CHARGE or WRITE_OFF")),
    };
    let reason = request.reason.trim().to_owned();
    if action == ParkedAction::WriteOff && reason.is_empty() {
        return Err(invalid("reason", "required to write usage off"));
    }
    if reason.chars().count() > PARKED_REASON_CHARS_MAX {
        return Err(invalid(
            "reason",
            &format!("at most {PARKED_REASON_CHARS_MAX} characters"),
        ));
    }
    Ok(ResolveParked {
        key,
        id,
        action,
        reason,
        by,
    })
}

pub async fn resolve(
    ledger: &dyn LedgerStore,
    state: &StateStore,
    command: &ResolveParked,
    now: tollgate_core::Timestamp,
) -> Result<(pb::ResolveParkedUsageReply, tollgate_core::AccountId), Status> {
    let resolved = tollgate_authority::parked::resolve(ledger, state, command, now)
        .await
        .map_err(authority_error)?;
    let account = resolved.record.account().map_err(authority_error)?;
    Ok((
        pb::ResolveParkedUsageReply {
            record: Some(record_to_pb(&resolved.record)),
            replayed: resolved.replayed,
        },
        account,
    ))
}

fn invalid(field: &str, message: &str) -> Status {
    ServiceError::invalid(field, message).into()
}

pub fn record_to_pb(row: &ParkedRow) -> pb::ParkedUsage {
    let parked = &row.parked;
    let state = match row.state {
        ParkedState::Open | ParkedState::Charging => pb::ParkedState::Open,
        ParkedState::Resolved => pb::ParkedState::Resolved,
    };
    let resolution = row.resolution.as_ref();
    pb::ParkedUsage {
        id: row.id.to_string(),
        region: parked.region.clone(),
        usage_id: parked.usage_id.clone(),
        account_id: parked.account.clone(),
        key: parked.key.clone(),
        kind: parked.kind.clone(),
        reason: parked.reason.clone(),
        feature: parked.feature.clone(),
        cost: parked.cost.to_string(),
        draws: parked
            .draws
            .iter()
            .map(|d| pb::Draw {
                grant_id: d.grant_id.to_string(),
                amount: d.amount.to_string(),
            })
            .collect(),
        overdraft: parked.overdraft.to_string(),
        event_time: Some(timestamp_to_pb(parked.at)),
        price_version: parked.price_version,
        quantity: parked.quantity.map(|q| q.to_string()).unwrap_or_default(),
        rate: parked.rate.map(|r| r.to_string()).unwrap_or_default(),
        price_rule: parked
            .price_rule
            .map_or(pb::PriceRule::Unspecified, price_rule_to_pb) as i32,
        actor: parked.actor.clone(),
        hold_id: parked.hold_id.clone(),
        parked_at: Some(timestamp_to_pb(row.parked_at)),
        state: state as i32,
        resolution: resolution.map(|r| r.resolution.clone()).unwrap_or_default(),
        resolved_by: resolution.map(|r| r.by.clone()).unwrap_or_default(),
        resolution_reason: resolution.map(|r| r.reason.clone()).unwrap_or_default(),
        resolved_at: resolution.map(|r| timestamp_to_pb(r.at)),
        debit_id: resolution.map(|r| r.debit_id.clone()).unwrap_or_default(),
        charged: resolution
            .filter(|r| !r.debit_id.is_empty())
            .map(|r| r.charged.to_string())
            .unwrap_or_default(),
        description: parked.description.clone(),
    }
}

/// `/metrics` lines for parked usage, read from the state store at scrape time: open records
/// and the micro-credits they served. A store that does not answer leaves them out (and says
/// so in the log), so the rest of the page is still served.
pub async fn metrics_text(state: &StateStore) -> String {
    match state.parked_open_totals().await {
        Ok((count, micros)) => format!(
            "# HELP tollgate_authority_parked_usage_open Parked usage records not resolved yet.\n\
             # TYPE tollgate_authority_parked_usage_open gauge\n\
             tollgate_authority_parked_usage_open {count}\n\
             # HELP tollgate_authority_parked_usage_open_micros Micro-credits served by parked usage not resolved yet.\n\
             # TYPE tollgate_authority_parked_usage_open_micros gauge\n\
             tollgate_authority_parked_usage_open_micros {micros}\n"
        ),
        Err(error) => {
            tracing::error!(%error, "reading parked usage for /metrics failed");
            String::new()
        }
    }
}

/// `GET /metrics` with the parked usage gauges after what `before` renders (the edge's
/// metrics on the embedded node; nothing on a bare authority).
pub fn metrics_router(
    state: StateStore,
    before: Arc<dyn Fn() -> String + Send + Sync>,
) -> axum::Router {
    axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let state = state.clone();
            let before = Arc::clone(&before);
            async move {
                let mut text = before();
                text.push_str(&metrics_text(&state).await);
                (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        "text/plain; version=0.0.4",
                    )],
                    text,
                )
            }
        }),
    )
}
